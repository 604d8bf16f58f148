"""Issue 12: the trace's SVG chart (transfers per exit over time), from synthetic records."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from regsync.trace.plot import _nice, series, svg

NS = "{http://www.w3.org/2000/svg}"


def _trace(runs: int, per_exit: list[int]) -> list[dict]:
    """runs KVM_RUN records; per_exit[i] transfers recorded at exit i (cycled)."""
    out = []
    for i in range(runs):
        out += [{"ioctl": "KVM_SET_REGS", "exit": i, "vcpu": 0}] * per_exit[i % len(per_exit)]
        out.append({"ioctl": "KVM_RUN", "exit": i, "vcpu": 0})
    return out


def test_series_averages_transfers_per_exit_in_buckets() -> None:
    pts = series(_trace(200, [4, 0]), buckets=10)            # 20 exits a bucket, 2 on average
    assert len(pts) == 10 and all(y == 2.0 for _, y in pts)
    assert [x for x, _ in pts] == [10.0 + 20 * i for i in range(10)]
    burst = series(_trace(100, [0]) + [{"ioctl": "KVM_GET_LAPIC", "exit": 95, "vcpu": 0}] * 50,
                   buckets=10)
    assert [y for _, y in burst] == [0.0] * 9 + [5.0]        # the late burst is in the last bucket
    assert series([{"ioctl": "KVM_GET_REGS", "exit": 0, "vcpu": 0}]) == []   # no run: no line
    uneven = series(_trace(25, [1]), buckets=10)              # 3 a bucket, the last one short
    assert len(uneven) == 9 and uneven[-1] == (24.5, 1.0)


def test_svg_has_one_line_per_trace_scaled_to_a_round_axis() -> None:
    doc = svg([("regsync", _trace(100, [0, 1])), ("qemu", _trace(100, [17]))], "hypercall")
    root = ET.fromstring(doc)
    lines = [p for p in root.iter(f"{NS}polyline") if p.get("class") == "series"]
    assert [p.get("data-name") for p in lines] == ["regsync", "qemu"]
    texts = [t.text for t in root.iter(f"{NS}text")]
    assert "hypercall" in texts and "regsync" in texts and "qemu" in texts and "20" in texts
    ys = {p.get("data-name"): [float(xy.split(",")[1]) for xy in p.get("points").split()]
          for p in lines}
    assert max(ys["qemu"]) < min(ys["regsync"])               # higher on the page = more transfers
    names = svg([("<&>", _trace(3, [1]))])
    assert "&lt;&amp;&gt;" in names and ET.fromstring(names) is not None


def test_nice_axis_tops() -> None:
    assert [_nice(v) for v in (0.3, 1, 1.2, 2.2, 17.96, 40, 101)] == [0.5, 1, 2, 2.5, 20, 50, 200]
