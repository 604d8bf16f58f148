"""Point mutmut's test map for import-time code at the whole test selection.

mutmut learns which tests reach a function by recording trampoline hits per test.
Code that runs when regsync is imported (the Registers class built by
make_register_file, the accessor factories of transport.py, accessors()'s
lru_cache, the dump-plan cache) is hit before the first test, so mutmut maps it to
whichever test happened to import regsync first, and a mutant of it is run against
that one test only. Every test of the selection runs with these objects, so map them
to all of them (run with process_isolation = "forkserver", forkserver_warmup = "none"
so each mutant imports regsync afresh). Run after mutmut has collected its stats.
"""
import json
PATH = "mutants/mutmut-stats.json"
IMPORT_TIME = [
    "regsync.regfile.x_make_register_file",
    "regsync.regfile.xǁ_RegisterAttrǁ__init__",
    "regsync.regfile.xǁ_AliasAttrǁ__init__",
    "regsync.regfile.xǁRegisterFileBaseǁ_dump_plan",
    "regsync.arch.x86_64.transport.x_write_refusals",
    "regsync.arch.x86_64.transport.x__segattr_get",
    "regsync.arch.x86_64.transport.x__segattr_set",
    "regsync.arch.x86_64.transport.x__bytes_get",
    "regsync.arch.x86_64.transport.x__bytes_set",
    "regsync.arch.x86_64.transport.x__lapic256_get",
    "regsync.arch.x86_64.transport.x__lapic256_set",
    "regsync.arch.x86_64.transport.x__xcr_get",
    "regsync.arch.x86_64.transport.x__xcr_set",
    "regsync.arch.x86_64.transport.x__attr_set",
]
d = json.load(open(PATH))
every = sorted(t.removeprefix("mutants/") for t in d["duration_by_test"])
for f in IMPORT_TIME:
    d["tests_by_mangled_function_name"][f] = every
json.dump(d, open(PATH, "w"))
print(len(every), "tests mapped to", len(IMPORT_TIME), "import-time functions")
