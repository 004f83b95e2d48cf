"""The ``moeplan`` command line (typer + rich). Thin shell: every command calls pure functions."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="moeplan",
    help="Plan, simulate, launch and check DeepSeek-V3-style MoE training runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
