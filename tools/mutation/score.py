"""Per-file mutation score from mutmut 3's meta files (run in the mutation clone).

Score = (killed + timeout) / (mutants - equivalent); the equivalent ones are named,
with the reason, in reasons.py. `--list` also prints every mutant not killed.
"""
import json
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reasons import E, R  # noqa: E402

FILES = {"cache.py": "mutants/src/regsync/cache.py.meta",
         "arch/x86_64/transport.py": "mutants/src/regsync/arch/x86_64/transport.py.meta",
         "regfile.py": "mutants/src/regsync/regfile.py.meta",
         "vcpu.py": "mutants/src/regsync/vcpu.py.meta"}
KILLED = {1, 3}                                  # a test failed / pytest error
# mutmut's timeout (SIGXCPU 24/152) and crashes of the worker (SIGSEGV, SIGKILL):
TIMEOUT = {36, 24, -24, 152, 255, -11, -9}


def main() -> None:
    rows, rest, tot = [], [], Counter()
    for f, meta in FILES.items():
        c = Counter()
        for name, code in json.load(open(meta))["exit_code_by_key"].items():
            short = name.replace("regsync.", "", 1)
            if code in KILLED:
                c["killed"] += 1
            elif code in TIMEOUT:
                c["timeout"] += 1
            else:
                kind, why = R.get(short, (None, None))
                c["equivalent" if kind == E else "alive"] += 1
                status = {0: "survived", 33: "no tests", 5: "no tests", None: "not run"}.get(
                    code, str(code))
                rest.append((short, status, kind, why))
        c["total"] = sum(1 for _ in json.load(open(meta))["exit_code_by_key"])
        tot.update(c)
        rows.append((f, c))
    print("| file | mutants | killed | timeout | equivalent | not killed | score | raw |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for f, c in rows + [("all four", tot)]:
        det = c["killed"] + c["timeout"]
        print(f"| {f} | {c['total']} | {c['killed']} | {c['timeout']} | {c['equivalent']} | "
              f"{c['alive']} | {100 * det / (c['total'] - c['equivalent']):.1f}% | "
              f"{100 * det / c['total']:.1f}% |")
    if "--list" in sys.argv:
        for short, status, kind, why in rest:
            print(f"{short}\t{status}\t{kind}\t{why}")


if __name__ == "__main__":
    main()
