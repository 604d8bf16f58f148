"""gdb stepi through regsync's stub vs QEMU's gdbstub (not a test).

    python benchmarks/gdb_stepi.py [--steps 500] [--no-qemu]

Both targets run the same image (src/regsync/guests/spin.bin, 2 vCPUs): gdb
connects, puts a hardware breakpoint on ``bw_0`` (the BSP's straight-line
work), continues to it, deletes it and runs ``stepi`` N times in one gdb
Python loop.  Reported per target: steps/s (gdb's wall clock around the
loop), and for regsync the vCPU ioctls per step and the cost of a stop
(ioctls and time from KVM_EXIT_DEBUG to the stop reply leaving the socket,
server-side timestamps) from ``monitor stats``.  QEMU's ioctls per step come
from two runs under ``strace -f`` (N and 2N steps; the difference / N).

QEMU runs with ``-enable-kvm`` when KVM works for it, else TCG (labelled).
Writes a table to stdout and benchmarks/out/gdb_stepi.json (git-ignored; ``--out
benchmarks/gdb_stepi.json`` updates the tracked copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from regsync import Machine
from regsync.gdb.adapter import register_ioctls
from regsync.gdb.server import attach_gdb
from regsync.guests import image_path, symbols

ROOT = Path(__file__).resolve().parent.parent
SPIN = symbols("spin")

GDB_SCRIPT = r'''
import gdb, json, os, time
n = int(os.environ["STEPS"])
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("target remote " + os.environ["TARGET"])
gdb.execute("hbreak *" + os.environ["BW0"])
gdb.execute("continue")
gdb.execute("delete")
stats = os.environ.get("STATS") == "1"
before = gdb.execute("monitor stats", to_string=True) if stats else "null"
pc0 = int(gdb.parse_and_eval("$pc"))
t0 = time.perf_counter()
for i in range(n):
    gdb.execute("stepi", to_string=True)
t1 = time.perf_counter()
after = gdb.execute("monitor stats", to_string=True) if stats else "null"
pc1 = int(gdb.parse_and_eval("$pc"))
print("RESULT " + json.dumps({"seconds": t1 - t0, "pc0": pc0, "pc1": pc1,
                              "before": json.loads(before), "after": json.loads(after)}))
gdb.execute(os.environ.get("END", "detach"))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gdb(target: str, steps: int, stats: bool, end: str, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(GDB_SCRIPT)
        script = f.name
    env = dict(os.environ, STEPS=str(steps), TARGET=target, BW0=hex(SPIN["bw_0"]),
               STATS="1" if stats else "0", END=end)
    try:
        r = subprocess.run(["gdb", "-nx", "-batch", "-x", script], capture_output=True,
                           text=True, timeout=timeout, env=env)
    finally:
        os.unlink(script)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    raise RuntimeError(f"gdb gave no result:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _sum_counters(snap: dict[str, Any]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in snap["ioctls"]:
        total.update(c)
    return total


def bench_regsync(steps: int, step_mode: str) -> dict[str, Any]:
    with Machine(smp=2) as m:
        m.load("spin")
        server = attach_gdb(m, 0, wait=True, announce=False)
        try:
            m.start(paused=True)
            server.target.step_mode = step_mode
            res = run_gdb(f"127.0.0.1:{server.port}", steps, True, "detach", 300)
        finally:
            server.close()
        m.memory.write_u64(SPIN["spin_stop"], 1)
        status = m.wait(30)
    before, after = res["before"], res["after"]
    delta = _sum_counters(after) - _sum_counters(before)
    stops = after["stops"] - before["stops"]
    lat = after["latencies_ns"][len(before["latencies_ns"]):]
    stop_io = after["stop_ioctls"][len(before["stop_ioctls"]):]
    return {
        "target": f"regsync (step-mode {step_mode})",
        "steps": steps, "seconds": res["seconds"], "steps_per_s": steps / res["seconds"],
        "ioctls_per_step": sum(delta.values()) / steps,
        "register_ioctls_per_step": register_ioctls(delta) / steps,
        "ioctls_by_name": dict(delta),
        "stops": stops,
        "stop_latency_us_median": statistics.median(lat) / 1000 if lat else None,
        "stop_latency_us_p90": sorted(lat)[int(len(lat) * 0.9)] / 1000 if lat else None,
        "stop_ioctls_mean": statistics.mean(a for a, _ in stop_io) if stop_io else None,
        "stop_register_ioctls_mean": statistics.mean(b for _, b in stop_io) if stop_io else None,
        "guest_exit_status": status,
    }


def qemu_accel() -> str:
    """'kvm' if QEMU can start a KVM guest here, else 'tcg'."""
    try:
        r = subprocess.run(["qemu-system-x86_64", "-enable-kvm", "-machine", "none",
                            "-display", "none", "-S", "-qmp", "stdio"], input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                           capture_output=True, text=True, timeout=20)
        return "kvm" if r.returncode == 0 else "tcg"
    except (OSError, subprocess.TimeoutExpired):
        return "tcg"


def _qemu_cmd(accel: str, port: int) -> list[str]:
    return ["qemu-system-x86_64", "-accel", accel, "-smp", "2", "-m", "64",
            "-kernel", str(image_path("spin")), "-S", "-gdb", f"tcp:127.0.0.1:{port}",
            "-nographic", "-display", "none", "-monitor", "none", "-serial", "null"]


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited early: {proc.stderr.read() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("QEMU's gdbstub did not open its port")


def _qemu_once(accel: str, steps: int, strace_out: str | None) -> dict[str, Any]:
    port = free_port()
    cmd = _qemu_cmd(accel, port)
    if strace_out:
        cmd = ["strace", "-f", "-qq", "-e", "trace=ioctl", "-o", strace_out] + cmd
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Probing the port would count as a gdb connection; just give QEMU time.
        time.sleep(1.0 if not strace_out else 2.0)
        return run_gdb(f"127.0.0.1:{port}", steps, False, "kill", 600)
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _count_ioctls(path: str) -> Counter[str]:
    names: Counter[str] = Counter()
    pat = re.compile(r"ioctl\(\d+, ([A-Z0-9_]+)")
    with open(path) as f:
        for line in f:
            mt = pat.search(line)
            if mt and mt.group(1).startswith("KVM_"):
                names[mt.group(1)] += 1
    return names


def bench_qemu(steps: int, count_ioctls: bool = True) -> dict[str, Any]:
    accel = qemu_accel()
    res = _qemu_once(accel, steps, None)
    out: dict[str, Any] = {
        "target": f"QEMU gdbstub ({'KVM' if accel == 'kvm' else 'TCG, KVM unusable'})",
        "steps": steps, "seconds": res["seconds"], "steps_per_s": steps / res["seconds"],
    }
    if count_ioctls and accel == "kvm" and shutil.which("strace"):
        counts = []
        with tempfile.TemporaryDirectory() as d:
            for n in (steps // 2, steps):
                path = os.path.join(d, f"strace-{n}")
                _qemu_once(accel, n, path)
                counts.append(_count_ioctls(path))
        diff = counts[1] - counts[0]
        per = steps - steps // 2
        out["ioctls_per_step"] = sum(diff.values()) / per
        out["register_ioctls_per_step"] = register_ioctls(diff) / per
        out["ioctls_by_name"] = {k: v / per for k, v in sorted(diff.items())}
        out["ioctl_method"] = "strace -f, (N - N/2 steps) difference"
    return out


# Runs write here unless told otherwise (git-ignored): the tracked
# benchmarks/gdb_stepi.json changes only when it is named with --out.
DEFAULT_OUT = ROOT / "benchmarks" / "out" / "gdb_stepi.json"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500, help="stepi count per run (default 500)")
    ap.add_argument("--no-qemu", action="store_true", help="measure regsync only")
    ap.add_argument("--repeat", type=int, default=3, help="runs per target (median reported)")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help=f"JSON output (default {DEFAULT_OUT.relative_to(ROOT)}, git-ignored; "
                         "the tracked benchmarks/gdb_stepi.json only when named here)")
    return ap


def main() -> int:
    args = build_parser().parse_args()
    use_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
    runs: dict[str, list[dict[str, Any]]] = {}
    for i in range(args.repeat):             # interleaved, so host noise hits all alike
        for r in (bench_regsync(args.steps, "alone"), bench_regsync(args.steps, "all"),
                  *([bench_qemu(args.steps, count_ioctls=(i == 0))] if use_qemu else [])):
            runs.setdefault(r["target"], []).append(r)
    rows = []
    for target, rs in runs.items():
        rates = sorted(r["steps_per_s"] for r in rs)
        row = dict(rs[0])                    # ioctl counts are deterministic: first run
        row["steps_per_s"] = statistics.median(rates)
        row["steps_per_s_runs"] = rates
        rows.append(row)

    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)
    print(f"gdb stepi x{args.steps}, spin guest, 2 vCPUs, median of {args.repeat} "
          f"({platform.node()}, {platform.release()})")
    print(f"{'target':<34} {'steps/s':>9} {'ioctls/step':>12} {'reg ioctls/step':>16}  runs")
    for r in rows:
        print(f"{r['target']:<34} {r['steps_per_s']:>9.0f} {f(r.get('ioctls_per_step')):>12} "
              f"{f(r.get('register_ioctls_per_step')):>16}  "
              + " ".join(f"{x:.0f}" for x in r["steps_per_s_runs"]))
    for r in rows:
        if "stop_latency_us_median" in r:
            print(f"{r['target']}: stop = KVM_EXIT_DEBUG -> stop reply sent: median "
                  f"{f(r['stop_latency_us_median'], '{:.0f}')} us, p90 "
                  f"{f(r['stop_latency_us_p90'], '{:.0f}')} us, "
                  f"{f(r['stop_ioctls_mean'])} ioctls "
                  f"({f(r['stop_register_ioctls_mean'])} register) per stop; "
                  f"ioctls: {r['ioctls_by_name']}")
        elif "ioctls_by_name" in r:
            print(f"{r['target']}: ioctls per step by name: "
                  + ", ".join(f"{k}={v:.2f}" for k, v in r["ioctls_by_name"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "host": platform.node(),
                                          "python": sys.version.split()[0],
                                          "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
