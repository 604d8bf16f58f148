"""Rewrite the score table and the list of mutants not killed in docs/mutation.md.

Run in the mutation clone: `python gen_doc.py /path/to/docs/mutation.md`. Only the
text between the <!-- score --> / <!-- mutants --> markers and their end markers changes.
"""
import os
import re
import subprocess
import sys

from mutmut.__main__ import find_mutant, get_diff_for_mutant

HERE = os.path.dirname(os.path.abspath(__file__))
doc_path = sys.argv[1]
out = subprocess.run([sys.executable, os.path.join(HERE, "score.py"), "--list"],
                     capture_output=True, text=True, check=True).stdout.splitlines()
table = "\n".join(line for line in out if line.startswith("|"))
lines, current = [], None
for row in (line.split("\t") for line in out if "\t" in line):
    short, status, kind, why = row
    fn = short.split("__mutmut")[0]
    if fn != current:
        lines.append(f"\n### {fn}\n")
        current = fn
    name = "regsync." + short
    try:
        diff = get_diff_for_mutant(name, path=find_mutant(name).path)
        plus = [d[1:].strip() for d in diff.splitlines() if d.startswith("+") and not d.startswith("+++")]
        change = plus[0] if plus else "(line removed)"
    except Exception as e:  # noqa: BLE001 - the list must still be written
        change = f"(diff unavailable: {e})"
    if kind in ("None", ""):
        kind, why = "not killed", f"no test yet ({status})"
    lines.append(f"- `{short.split('__mutmut_')[-1]}` `{change[:100]}` -- {kind}: {why}")
doc = open(doc_path).read()
doc = re.sub(r"(<!-- score -->\n).*?(<!-- /score -->)", lambda m: m[1] + table + "\n" + m[2],
             doc, flags=re.S)
doc = re.sub(r"(<!-- mutants -->\n).*?(<!-- /mutants -->)",
             lambda m: m[1] + "\n".join(lines).strip() + "\n" + m[2], doc, flags=re.S)
open(doc_path, "w").write(doc)
print(table)
