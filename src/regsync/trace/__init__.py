"""The sync trace: why each register crossed into or out of the kernel, and who asked.

One door:

    from regsync.trace import SyncTrace
    with open("sync.jsonl", "w") as f:
        tr = SyncTrace(f)
        for v in machine.vcpus:
            tr.attach(v)             # on the vCPU's thread, or before start()
        ...
        tr.detach()

``regsync run GUEST --trace-sync FILE`` does this for a whole run, ``regsync trace
FILE`` prints the summary (``--chrome OUT`` exports Chrome/Perfetto JSON), and
gdb's ``monitor trace on|off|show`` drives it from a debugger. Off, it costs
nothing: no tracing code runs on the hot path (recorder.py says how).
"""

from .recorder import SyncTrace
from .summary import format_summary, load, summary, to_chrome, transfers

__all__ = ["SyncTrace", "load", "summary", "format_summary", "to_chrome", "transfers"]
