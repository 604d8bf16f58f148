"""The snapshot parts of the ``regsync`` command (cli.py registers them in a few lines).

    regsync run GUEST --save-on-exit FILE    save the whole machine when the guest stops
    regsync run --restore FILE               go on from a saved machine
    regsync snapshot info FILE               what a snapshot file holds

Errors are SnapshotError (a ValueError): cli.main prints them as one line, status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..memory import PAGE


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--save-on-exit", metavar="FILE",
                     help="when the guest stops (exit, --timeout, Ctrl-C), save the whole machine "
                          "to FILE (regsync snapshot info FILE shows it)")
    run.add_argument("--restore", metavar="FILE",
                     help="go on from a snapshot file instead of loading GUEST (vCPUs and memory "
                          "come from the file)")


def add_snapshot_parser(sub: Any) -> None:
    s = sub.add_parser("snapshot", help="snapshot files: 'regsync snapshot info FILE'")
    ssub = s.add_subparsers(dest="snapshot_command", metavar="ACTION", parser_class=type(s))
    info = ssub.add_parser("info", help="what a snapshot file holds (validated whole first)")
    info.add_argument("file", help="the snapshot file")
    info.add_argument("--json", action="store_true", help="as JSON on stdout")


def shape_from_snapshot(args: argparse.Namespace) -> None:
    """``run --restore``: vCPUs and memory come from the file (validated whole here)."""
    if not getattr(args, "restore", None):
        return
    from .fileformat import read
    st = read(args.restore).state
    args.smp, args.mem = st.smp, st.mem_bytes >> 20
    if st.guest:
        args.guest = f"{st.guest.get('name', args.guest)} (restored from {args.restore})"


def restore_into(m: Any, args: argparse.Namespace) -> bool:
    """``run --restore``: put the file's state into the new machine; False to load GUEST."""
    if not getattr(args, "restore", None):
        return False
    m.restore(args.restore)
    return True


def save_on_exit(m: Any, args: argparse.Namespace) -> None:
    path = getattr(args, "save_on_exit", None)
    if path:
        size = m.save(path)
        print(f"regsync: saved the machine to {path} ({size} bytes)", file=sys.stderr)


def describe(path: str) -> dict[str, Any]:
    """Everything ``snapshot info`` prints, as data."""
    from ..arch.x86_64 import CATALOG
    from .fileformat import read
    info = read(path)
    st = info.state
    vcpus = []
    for v in st.vcpus:
        regs = {}
        for name, field in (("REGS", "rip"), ("MP_STATE", "mp_state")):
            data = v.groups.get(name)
            if data is not None:
                from ..arch.x86_64.transport import accessors
                from ..kvm import structs as ks
                struct = ks.kvm_regs if name == "REGS" else ks.kvm_mp_state
                get, _ = accessors(CATALOG.by_name[field])
                regs[field] = get(struct.from_bytes(data))
        vcpus.append({"id": v.id, **regs, "groups": sorted(v.groups)})
    stored = sum(img.stored_bytes for img in st.memory)
    return {
        "file": info.path, "format": info.version, "arch": info.arch, "size": info.size,
        "written": st.info, "guest": st.guest, "irqchip": st.irqchip, "vcpus": vcpus,
        "memory": {"bytes": st.mem_bytes, "stored_pages": stored // PAGE,
                   "slots": [{"gpa": s.gpa, "size": s.size, "runs": len(s.extents)}
                             for s in st.memory]},
        "vm": sorted(st.vm), "devices": st.devices, "sections": info.sections,
    }


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.snapshot_command != "info":
        raise ValueError("snapshot: an action is required: info FILE")
    d = describe(args.file)
    if args.json:
        import json
        print(json.dumps(d, indent=1, default=str))
        return 0
    w = d["written"]
    print(f"{d['file']}: regsync snapshot, format {d['format']}, {d['arch']}, {d['size']} bytes"
          f" (checksum good)")
    print(f"  written by regsync {w.get('regsync', '?')} at {w.get('created', '?')}")
    g = d["guest"]
    if g:
        print(f"  guest: {g.get('name')} (entry {g.get('entry', 0):#x}, {g.get('mode')}, "
              f"arg {g.get('arg')})")
    mem = d["memory"]
    print(f"  memory: {mem['bytes'] >> 20} MiB in {len(mem['slots'])} slot(s), "
          f"{mem['stored_pages']} non-zero pages stored")
    print(f"  vCPUs: {len(d['vcpus'])}; in-kernel irqchip: {'yes' if d['irqchip'] else 'no'}")
    for v in d["vcpus"]:
        print(f"    vCPU {v['id']}: rip {v.get('rip', 0):#x}, mp_state {v.get('mp_state')}, "
              f"groups {' '.join(v['groups'])}")
    print(f"  VM-wide: {' '.join(d['vm']) or 'none'}; devices: "
          f"{', '.join(d['devices']) or 'none'}")
    print("  sections: " + ", ".join(f"{n} {s}" for n, s in d["sections"].items()
                                      if not n.startswith("vcpu") or n.endswith("/REGS")))
    return 0
