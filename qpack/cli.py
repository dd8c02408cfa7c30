"""The `qpack` command line: one click group; each subcommand lives in qpack/commands/<name>.py.

A command module exposes `command` (a click.Command). This file only collects them and turns every
QpackError, and every usage error of a subcommand (an unknown option, a value outside a choice), into one line
on stderr with exit code 2.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from . import __version__
from .errors import QpackError


class _Group(click.Group):
    """Collects commands from qpack.commands and maps qpack errors to exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_commands())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _commands().get(name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (QpackError, click.UsageError) as exc:  # click's own usage error would print 4 lines
            msg = str(exc)
            if isinstance(exc, click.UsageError) and exc.ctx is not None and exc.ctx.parent is not None:
                msg = f"qpack {exc.ctx.info_name}: {exc.format_message()}"  # name the subcommand
            click.echo(f"qpack: error: {msg}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("qpack: interrupted", err=True)
            ctx.exit(130)


_CACHE: dict[str, click.Command] | None = None


def _commands() -> dict[str, click.Command]:
    global _CACHE
    if _CACHE is None:
        from . import commands

        found: dict[str, click.Command] = {}
        for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            mod = importlib.import_module(f"{commands.__name__}.{info.name}")
            cmd = getattr(mod, "command", None)
            if isinstance(cmd, click.Command):
                found[cmd.name] = cmd
        _CACHE = found
    return _CACHE


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qpack")
def main() -> None:
    """qpack: fit the best language model into a fixed byte budget."""


if __name__ == "__main__":
    sys.exit(main())
