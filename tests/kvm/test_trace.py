"""Issue 12: the sync trace records every transfer with its reason and caller."""

from __future__ import annotations

import io
import json
import sys

import pytest

from regsync import Machine
from regsync.trace import SyncTrace, format_summary, load, summary, to_chrome, transfers
from ticks import run_to_tick  # tests/kvm/ticks.py

STAR = 0x0023_0010_0000_0000
HERE = "tests/kvm/test_trace.py"


def line() -> int:
    return sys._getframe(1).f_lineno + 1        # the line after the call


def test_a_known_sequence_gives_exactly_its_records() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        out = io.StringIO()
        tr = SyncTrace(out)
        tr.attach(v)
        name = "test_a_known_sequence_gives_exactly_its_records"
        rax = v.regs.rax                     # held (kvm_run page): no transfer
        at_dr0 = line()
        v.regs.dr0
        v.regs.star = STAR                   # queued: no transfer yet
        v.regs.r12 = 1000                    # queued in kvm_dirty_regs
        at_run = line()
        v.run()
        tr.detach()
        got = [{k: r[k] for k in ("ioctl", "group", "registers", "reason", "caller")}
               for r in tr.records]
        assert got == [
            {"ioctl": "KVM_GET_DEBUGREGS", "group": "DEBUGREGS", "registers": ["dr0"],
             "reason": "read miss", "caller": f"{HERE}:{at_dr0} {name}"},
            {"ioctl": "KVM_SET_MSRS", "group": "MSRS", "registers": ["star"],
             "reason": "flush before run", "caller": f"{HERE}:{at_run} {name}"},
            {"ioctl": "kvm_run", "group": "REGS", "registers": ["r12"],
             "reason": "flush before run", "caller": f"{HERE}:{at_run} {name}"},
            {"ioctl": "KVM_RUN", "group": None, "registers": [],
             "reason": "run", "caller": f"{HERE}:{at_run} {name}"},
        ], got
        assert rax is not None
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [x["ioctl"] for x in lines] == [r["ioctl"] for r in got]
        # detached: nothing more is recorded, and the originals are back
        v.regs.dr1
        assert len(tr.records) == 4
        assert "_io" not in v.handle.__dict__ and type(v.cache.transport).__name__ == "KvmTransport"


def test_reasons_synchronize_side_effect_and_flush() -> None:
    with Machine(smp=1) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        tr = SyncTrace()
        tr.attach(v)
        v.regs.r12 = 5
        v.synchronize("RESET")                 # MP_STATE first: the r12 edit goes by ioctl
        v.regs.r13 = 6
        v.flush()
        tr.detach()
        reasons = [(r["ioctl"], r["reason"]) for r in tr.records]
        assert reasons[0] == ("KVM_SET_REGS", "write before side-effect fetch")
        assert ("KVM_GET_MP_STATE", "synchronize") in reasons
        assert ("KVM_GET_REGS", "side-effect check") in reasons
        assert reasons[-1] == ("KVM_SET_REGS", "flush()")


@pytest.mark.parametrize("strategy,edit,sets_per_run", [
    ("regsync", False, 0), ("regsync", True, 0),     # an edit of r12 rides kvm_run
    ("eager", False, 0), ("eager", True, 8),         # any change: every group written back
    ("qemu", False, 8)])                             # a read marks the vCPU dirty
def test_each_strategy_shows_its_write_back(strategy: str, edit: bool, sets_per_run: int) -> None:
    with Machine(smp=1, strategy=strategy) as m:
        m.load("counter")
        v = m.vcpus[0]
        run_to_tick(m, v)
        tr = SyncTrace()
        tr.attach(v)
        for _ in range(3):
            if edit:
                v.regs.r12 = 7
            else:
                v.regs.rax
            run_to_tick(m, v)
        tr.detach()
        sets = [r for r in transfers(tr.records) if r["ioctl"].startswith("KVM_SET")]
        assert all(r["reason"] == "flush before run" for r in sets), sets
        assert (len(sets) >= 3 * sets_per_run) if sets_per_run else not sets, sets


def test_summary_and_chrome_export(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    with Machine(smp=1) as m, open(path, "w") as f:
        m.load("counter")
        v = m.vcpus[0]
        tr = SyncTrace(f)
        tr.attach(v)
        for _ in range(5):
            run_to_tick(m, v)
            v.regs.dr0
        tr.detach()
    recs = load(path)
    s = summary(recs)
    assert s["runs"] >= 5 and s["by_reason"]["read miss"] == 5
    assert s["by_register"]["dr0"] == 5
    text = format_summary(s)
    assert "read miss" in text and "KVM_GET_DEBUGREGS" in text
    chrome = to_chrome(recs)
    assert {e["ph"] for e in chrome["traceEvents"]} == {"M", "i"}
    json.dumps(chrome)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"vcpu": 0, "ioctl": "X"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        load(bad)


def test_cli_traces_per_strategy_summaries_and_chart(tmp_path) -> None:
    """`regsync run --trace-sync` for two strategies, then `regsync trace A B --svg`: a
    summary each, a chart with a line each (qemu's above regsync's), and bad input
    as one line with exit 2."""
    import subprocess
    import xml.etree.ElementTree as ET
    exe = [sys.executable, "-m", "regsync"]
    paths = {}
    for strategy in ("regsync", "qemu"):
        paths[strategy] = tmp_path / f"{strategy}.jsonl"
        p = subprocess.run([*exe, "run", "hypercall", "--arg", "200", "--strategy", strategy,
                            "--trace-sync", str(paths[strategy])],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    chart = tmp_path / "chart.svg"
    p = subprocess.run([*exe, "trace", str(paths["regsync"]), str(paths["qemu"]), "--svg",
                        str(chart)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("== ") == 2 and "KVM_RUN" in p.stdout
    assert f"wrote {chart} (2 lines)" in p.stderr
    ns = "{http://www.w3.org/2000/svg}"
    lines = {e.get("data-name"): [float(xy.split(",")[1]) for xy in e.get("points").split()]
             for e in ET.parse(chart).getroot().iter(f"{ns}polyline") if e.get("class")}
    assert set(lines) == {"regsync", "qemu"}
    assert sum(lines["qemu"]) < sum(lines["regsync"])     # y grows upward: qemu moves more
    one = subprocess.run([*exe, "trace", str(paths["regsync"]), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert one.returncode == 0 and json.loads(one.stdout)["syscalls"] == 0
    for args, text in (([str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                       ([str(paths["regsync"]), "--svg", str(tmp_path / "no" / "x.svg")], "--svg")):
        bad = subprocess.run([*exe, "trace", *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and text in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
