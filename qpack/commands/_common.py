"""Helpers shared by the CLI commands: progress bars on stderr and plain-text tables."""
from __future__ import annotations

import sys
from typing import Iterable, Sequence

import click


def progress_bar(it: Iterable, desc: str, total: int) -> Iterable:
    """A tqdm bar on stderr (silent when stderr is not a terminal and the work is short)."""
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None if total < 4 else False)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print rows under headers, columns padded; numbers right-aligned."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, r)]

    def fmt(cells):
        out = []
        for c, w in zip(cells, widths):
            c = str(c)
            numeric = c.replace(",", "").replace(".", "").replace("-", "").replace("%", "").replace("+", "").isdigit()
            out.append(c.rjust(w) if numeric else c.ljust(w))
        return "  ".join(out).rstrip()

    click.echo(fmt(headers))
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo(fmt(r))
