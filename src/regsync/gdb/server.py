"""The gdb server: a socket loop on its own thread around StubCore + MachineTarget.

    server = attach_gdb(machine, 1234, wait=True)   # before machine.start(paused=True)
    ...
    server.close()

One gdb at a time on 127.0.0.1.  The loop (``selectors``) watches the
listening socket, the connected gdb and a wake-up pipe; vCPU threads and the
machine's exit listener never touch the socket: they queue a record and
write a byte to the pipe, and the loop turns it into a stop reply (or a
``W``/``X`` when the guest exits).  A new connection stops the machine and
gets ``T05`` for thread 1 (or the stop a vanished gdb left the guest at).
``D`` detaches (breakpoints removed, guest debug cleared, the VM runs on);
an EOF or a broken connection is a vanished client, which leaves the guest
as it was (MachineTarget.vanish): a port probe never starts a ``--wait``
guest.  Nothing gdb sends can end the server or the VM except ``k``.

No client can starve the next: input is served at most ``_BATCH`` bytes per
turn of the loop (stop events, accepts and a hang-up check in between), so
what a client pipelined dies with its connection instead of being answered
to nobody; the listen backlog takes a burst of reconnects.  ``sessions``
records each connection (packets handled, how it ended).
"""

from __future__ import annotations

import collections
import os
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from .adapter import DebugCaps, MachineTarget, StopRecord
from .core import StubCore

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["GdbServer", "attach_gdb"]

#: Bytes of gdb input handled per turn of the loop (a few hundred packets).
_BATCH = 4096
#: Connections the kernel queues while the loop is busy (gdb reconnects, probes).
_BACKLOG = 16
_HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR


class GdbServer:
    """Serves gdb's remote protocol for ``machine`` on ``host:port`` (0 = any free port)."""

    def __init__(self, machine: "Machine", port: int, *, wait: bool = False,
                 host: str = "127.0.0.1", caps: DebugCaps | None = None,
                 log: Any = None) -> None:
        self.m = machine
        self.wait = wait
        self.log = log if log is not None else sys.stderr
        self.target = MachineTarget(machine, caps, notify=self._post)
        self.target.say = self._say
        self.listener = socket.create_server((host, port), backlog=_BACKLOG)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._events: collections.deque[Any] = collections.deque()
        self._closing = False
        self.client: socket.socket | None = None
        self.core: StubCore | None = None
        self.connections = 0
        self.vm_exit_status: int | None = None
        self.errors: list[str] = []
        #: One record per connection: packets handled (all, by name) and how it ended.
        self.sessions: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._inbox = bytearray()       # received from the client, not yet handled
        self._turns = 0                 # batches served since the last recv
        self._hangup: select.poll | None = None
        self.connected = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listening = False
        machine.debug_handler = self.target.on_debug_exit
        machine.exit_listeners.append(self._on_vm_exit)
        self._thread = threading.Thread(target=self._main, name="gdb-server", daemon=True)
        self._thread.start()

    # --- called from other threads ---------------------------------------------------
    def _post(self, item: Any) -> None:
        self._events.append(item)
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass        # the pipe is full: the loop is awake anyway

    def _on_vm_exit(self, status: int) -> None:
        self._post(("exit", status))

    def close(self) -> None:
        """Stop serving: detach a connected gdb (if the VM still runs) and join the thread."""
        if self._closing:
            return
        self._closing = True
        self._post(("close",))
        self._thread.join(10)
        if self.m.debug_handler == self.target.on_debug_exit:
            self.m.debug_handler = None
        try:
            self.m.exit_listeners.remove(self._on_vm_exit)
        except ValueError:
            pass

    def __enter__(self) -> "GdbServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop (server thread) --------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self._closing:
                if not self._listening and self.m.threads:
                    # Accept only once the vCPU threads exist: before start() a
                    # connection would see a machine that is about to change state.
                    self._sel.register(self.listener, selectors.EVENT_READ, "listen")
                    self._listening = True
                timeout = 0 if self._inbox else None if self._listening else 0.02
                for key, _ in self._sel.select(timeout):
                    if key.data == "wake":
                        self._drain_wake()
                        self._process_events()
                    elif key.data == "listen":
                        self._accept()
                    elif key.data == "client":
                        self._read_client()
                    if self._closing:
                        break
                if self._inbox and not self._closing:
                    self._serve_batch()
        except Exception:  # noqa: BLE001 - report, never take the VM down
            self._error("server loop failed:\n" + traceback.format_exc())
        finally:
            live = self.vm_exit_status is None and self.m.exit_status is None
            self._drop_client("closed", detach=live)
            self._sel.close()
            self.listener.close()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _say(self, text: str) -> None:
        try:
            print(f"regsync gdb: {text}", file=self.log)
        except Exception:  # noqa: BLE001
            pass

    def _error(self, text: str) -> None:
        self.errors.append(text)
        try:
            print(f"regsync gdb: {text}", file=self.log)
        except Exception:  # noqa: BLE001
            pass

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)   # one read: leftovers only cost a spare wake-up
        except (BlockingIOError, OSError):
            pass

    def _accept(self) -> None:
        try:
            sock, _addr = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        if self.client is not None and self._peer_gone():
            self._drop_client("vanished")      # its queued work dies with it
        if self.client is not None or self.vm_exit_status is not None \
                or self.m.exit_status is not None:
            sock.close()        # one gdb at a time; nothing to debug after the exit
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(True)
        sock.settimeout(10.0)
        try:
            initial = self.target.attach()
        except Exception:  # noqa: BLE001
            self._error("cannot stop the machine for gdb:\n" + traceback.format_exc())
            sock.close()
            return
        self.target.reported(initial)
        self.core = StubCore(self.target, initial_stop=initial)
        core = self.core
        self.target.current_thread = lambda: core.current_thread
        self.client = sock
        self.connections += 1
        self.sessions.append({"packets": 0, "by_packet": {}, "end": None})
        self._inbox.clear()
        self._turns = 0
        self._hangup = select.poll()
        self._hangup.register(sock, _HANGUP)
        self._sel.register(sock, selectors.EVENT_READ, "client")
        self.connected.set()

    def _peer_gone(self) -> bool:
        """The client hung up or broke (even with unread input still queued)."""
        if self._hangup is None:
            return False
        try:
            return any(ev & _HANGUP for _, ev in self._hangup.poll(0))
        except OSError:
            return True

    def _read_client(self) -> None:
        sock, core = self.client, self.core
        if sock is None or core is None or self._inbox:
            return                          # the loop serves what is queued first
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                        # gdb went away without detaching
            self._drop_client("vanished")
            return
        self._inbox += data
        self._turns = 0

    def _serve_batch(self) -> None:
        """Hand at most _BATCH queued bytes to the core and send its replies."""
        core = self.core
        if core is None:
            self._inbox.clear()
            return
        if self._turns and self._peer_gone():
            self._drop_client("vanished")   # what it pipelined dies with it
            return
        chunk = bytes(self._inbox[:_BATCH])
        del self._inbox[:_BATCH]
        self._turns += 1
        try:
            out = core.receive(chunk)
        except Exception:  # noqa: BLE001 - a stub bug must not kill the VM
            self._error("protocol handler failed; dropping gdb:\n" + traceback.format_exc())
            self._drop_client("error")
            return
        self._send(out)
        if core.wants_close and self.core is core:
            self._drop_client("detached" if self.target.state == "detached" else "killed",
                              detach=False)

    def _send(self, data: bytes) -> bool:
        if not data:
            return True
        if self.client is None:
            return False
        try:
            self.client.sendall(data)
            return True
        except OSError:
            self._drop_client("vanished")
            return False

    def _drop_client(self, how: str, detach: bool | None = None) -> None:
        """Close the connection. ``how`` is recorded; a "vanished" client leaves the
        guest as it was (MachineTarget.vanish), ``detach=True`` lets it run."""
        sock, core, self.client, self.core = self.client, self.core, None, None
        self._inbox.clear()
        self._hangup = None
        if sock is None:
            return
        if self.sessions and self.sessions[-1]["end"] is None and core is not None:
            self.sessions[-1].update(packets=core.packets, by_packet=dict(core.by_packet),
                                     end=how)
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.connected.clear()
        if self.m.exit_status is not None or self.target.state == "detached":
            return
        try:
            if detach:
                self.target.detach()
            elif how in ("vanished", "error"):
                self.target.vanish()
        except Exception:  # noqa: BLE001
            self._error(f"cleaning up after a {how} client failed:\n"
                        + traceback.format_exc())

    def _process_events(self) -> None:
        while self._events:
            item = self._events.popleft()
            if isinstance(item, StopRecord):
                self._report_stop(item)
            elif item[0] == "exit":
                self.vm_exit_status = item[1]
                core = self.core
                if core is not None:
                    status, sig = self.target.exit_reply_args(item[1])
                    self._send(core.on_exit(status, sig))
                    self._drop_client("exit", detach=False)
            elif item[0] == "close":
                return

    def _report_stop(self, rec: StopRecord) -> None:
        core = self.core
        if core is None or core.stopped:
            return
        try:
            event = self.target.complete_stop(rec, core.layout)
            if event is None:
                return
            reply = core.on_stop(event)
            self.target.reported(event)
        except Exception:  # noqa: BLE001
            self._error("reporting a stop failed:\n" + traceback.format_exc())
            return
        if self._send(reply) and rec.t_exit:
            stats = self.target.stats
            stats.latencies_ns.append(time.perf_counter_ns() - rec.t_exit)
            total, reg = self.target._ioctl_totals()
            stats.stop_ioctls.append((total - rec.ioctls_at_exit[0], reg - rec.ioctls_at_exit[1]))


def attach_gdb(machine: "Machine", port: int, *, wait: bool = False,
               host: str = "127.0.0.1", caps: DebugCaps | None = None,
               announce: bool = True) -> GdbServer:
    """Serve gdb for ``machine`` on ``host:port``; returns the server (``close()`` it).

    Call it before ``machine.start(paused=wait)``: with ``wait`` the guest
    does not run until gdb continues.  Probes once per process what guest
    debugging can do here (a few ms in throwaway VMs)."""
    server = GdbServer(machine, port, wait=wait, host=host, caps=caps)
    if announce:
        print(f"regsync: gdb stub on {host}:{server.port} (gdb: target remote {host}:"
              f"{server.port}){'; the guest waits for gdb' if wait else ''}", file=sys.stderr)
    return server
