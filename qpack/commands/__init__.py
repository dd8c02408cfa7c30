"""CLI subcommands, one module each; every module exposes `command` (a click.Command)."""
