"""Run in a fresh process: open one hostile file the way a user would, report outcome, time and memory as JSON.

    python probe.py container|artifact|checkpoint FILE... [--as-limit-mib N]

One JSON line per file. With several files, rss_growth is the growth of the peak since before the first
file (the peak only rises), so the largest value bounds every file's.

Memory is the growth of the process's peak RSS (ru_maxrss) over its value just before the call, plus the
tracemalloc peak of Python allocations during it. An address-space limit keeps a runaway decoder from
hurting the machine: it then fails with MemoryError, which is reported as a finding, not hidden.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import tracemalloc


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    args = sys.argv[1:]
    limit_mib = 0
    if "--as-limit-mib" in args:
        i = args.index("--as-limit-mib")
        limit_mib = int(args[i + 1])
        del args[i: i + 2]
    mode, paths = args[0], args[1:]
    from qpack.errors import QpackFormatError

    if mode == "container":
        from qpack.container import read_container

        def action(path):
            c = read_container(path)
            for s in c.sections:
                c.section(s.name)
    elif mode == "artifact":
        from qpack.artifact import read_artifact

        def action(path):
            read_artifact(path).tensors()
    else:
        from qpack.checkpoint import load_state_dict

        def action(path):
            load_state_dict(path)
    if limit_mib:
        cap = _vm_bytes() + limit_mib * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    rss0 = _rss_kib()
    tracemalloc.start()
    for path in paths:
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        out: dict = {"file": os.path.basename(path)}
        try:
            action(path)
            out["outcome"] = "loaded"
        except QpackFormatError as exc:
            out.update(outcome="refused", reason=exc.reason.value, message=str(exc))
        except BaseException as exc:  # anything else is a finding
            out.update(outcome="finding", error=f"{type(exc).__name__}: {exc}"[:500])
        out["seconds"] = time.perf_counter() - t0
        out["py_peak"] = tracemalloc.get_traced_memory()[1]
        out["rss_growth"] = max(0, _rss_kib() - rss0) * 1024
        out["file_size"] = os.path.getsize(path)
        print(json.dumps(out), flush=True)
    tracemalloc.stop()


if __name__ == "__main__":
    main()
