"""Turn a QPACK_RELIABILITY_LOG file (JSON lines) into the markdown tables of benchmarks/reliability/.

    python tests/reliability/summarize.py /tmp/rel.jsonl "long pass" >> benchmarks/reliability/long_pass.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    title = sys.argv[2] if len(sys.argv) > 2 else "run"
    by = defaultdict(list)
    for r in rows:
        by[r.pop("part")].append(r)
    print(f"### {title}\n")
    examples = len(by.pop("1 hypothesis example", []))
    if examples:
        print(f"- Hypothesis round-trip property: {examples:,} examples, all passed")
    for part in ("1 atheris", "1 atheris long"):
        for r in by.pop(part, []):
            print(f"- atheris `{r['target']}`: {r['inputs']:,} inputs in {r['seconds']} s, {r['findings']} findings")
    for r in by.pop("2 corruption", []):
        print(f"- corruption, {r['artifact']} ({r['bytes']:,} bytes): {r['variants']:,} variants, "
              f"{r['undetected']} not refused as QpackFormatError")
    for r in by.pop("3 hostile", []):
        print(f"- hostile files: {r['files']} refused with the expected reason; max tracemalloc peak "
              f"{r['max_py_peak'] / 2**20:.1f} MiB, max peak-RSS growth {r['max_rss_growth'] / 2**20:.1f} MiB, "
              f"max {r['max_seconds']:.2f} s")
    bombs = by.pop("4 bomb", [])
    if bombs:
        print("\n| bomb | outcome | reason | seconds | tracemalloc peak MiB | RSS growth MiB |\n|---|---|---|---|---|---|")
        for r in sorted(bombs, key=lambda r: r["file"]):
            print(f"| {r['file']} | {r['outcome']} | {r.get('reason', '-')} | {r['seconds']:.2f} | "
                  f"{r['py_peak'] / 2**20:.1f} | {r['rss_growth'] / 2**20:.1f} |")
        print()
    for part in ("6 kills", "6 kills long"):
        for r in by.pop(part, []):
            what = r.pop("what")
            print(f"- SIGKILL, {what}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.items()))
                  + " (never a partial file)")
    for part, items in by.items():
        print(f"- {part}: {items}")
    print()


if __name__ == "__main__":
    main()
