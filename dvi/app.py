"""The typer applications every `dvi` command registers on: `app` (top level) and `bench_app`
(`dvi bench ...`). They import no command, so command modules import them without a cycle;
`dvi/cli.py` imports the command modules (`COMMAND_MODULES`) and runs `app`."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Draft, Verify, and Improve: lossless self-speculative decoding with an online-trained drafter.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print and save tables and plots.")
app.add_typer(bench_app, name="bench")
