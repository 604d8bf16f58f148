"""Names of the mutants not killed yet: `alive.py import` (import-time code, for the
forkserver run) or `alive.py other [cache regfile vcpu transport]`; `--skip-equivalent`
leaves out the ones reasons.py calls equivalent."""
import glob
import json
import sys

DETECTED = {1, 3, 36, 24, -24, 152, 255, -11, -9}     # killed, or timeout (see score.py)
IMPORT_TIME = ("x_make_register_file", "_RegisterAttrǁ__init__", "_AliasAttrǁ__init__",
               "_dump_plan", "x_write_refusals", "x__segattr", "x__bytes_", "x__lapic256",
               "x__xcr_", "x__attr_set")
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reasons import E, R  # noqa: E402

mode = sys.argv[1]
skip_equivalent = "--skip-equivalent" in sys.argv
files = [a for a in sys.argv[2:] if not a.startswith("--")] or ["cache", "regfile", "vcpu", "transport"]
for meta in glob.glob("mutants/src/regsync/**/*.meta", recursive=True):
    if not any(f"/{f}.py" in meta for f in files):
        continue
    for name, code in json.load(open(meta))["exit_code_by_key"].items():
        if skip_equivalent and R.get(name.replace("regsync.", "", 1), ("",))[0] == E:
            continue
        if code not in DETECTED and (mode == "import") == any(s in name for s in IMPORT_TIME):
            print(name)
