"""A pre-imported parent that forks one child per job, so a kill test pays the imports once.

Protocol (one JSON object per stdin line): {"kind": "writer", "target", "tag", "size"} writes a container
through qpack.container.write_container; {"kind": "cli", "args": [...]} runs `qpack ARGS...` in the child.
For each job the zygote prints the child's pid, waits for it, then prints "exit STATUS" (the raw waitpid
status: a SIGKILLed child reads 9). The test kills the pid at a moment of its choosing.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (imported before fork; no torch work runs in this process)

torch.set_num_threads(1)
from qpack.cli import main as cli_main  # noqa: E402
from qpack.codecs import make_codec  # noqa: E402
from qpack.container import encode_section, write_container  # noqa: E402


def run(job: dict) -> int:
    if job["kind"] == "writer":
        tag, size = job["tag"], job["size"]
        payload = (tag.encode() * (size // len(tag) + 1))[:size]
        secs = [encode_section("a", make_codec("raw"), payload),
                encode_section("b", make_codec("zlib", {"level": 1}), payload)]
        write_container(job["target"], {"tag": tag}, [], secs)
        return 0
    try:
        cli_main(job["args"], standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = 3
            try:
                code = run(job)
            finally:
                os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", status, flush=True)


if __name__ == "__main__":
    main()
