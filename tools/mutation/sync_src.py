"""Refresh mutants/src from src/ for every file mutmut does not mutate.

mutmut 3 copies src/ into mutants/ once (copy_src_dir skips files that exist), so
after a git pull the unmutated modules the tests import would stay old. Run in the
mutation clone before each `mutmut run`.
"""
import filecmp
import os
import shutil

MUTATED = {"regsync/cache.py", "regsync/regfile.py", "regsync/vcpu.py",
           "regsync/arch/x86_64/transport.py"}

for root, dirs, files in os.walk("src"):
    dirs[:] = [d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info")]
    for f in files:
        src = os.path.join(root, f)
        rel = os.path.relpath(src, "src")
        dst = os.path.join("mutants", "src", rel)
        if rel in MUTATED or (os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False)):
            continue
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
        print("refreshed", rel)
