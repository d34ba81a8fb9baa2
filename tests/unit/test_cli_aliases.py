"""Renamed flags keep their old names as aliases for one release (common/core/vocabulary.py)."""

import typer.main

from dvi.app import app
from dvi.cli import _register


def option_names(*path: str) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_context_flags_accept_their_old_lookup_names():
    _register()
    for path in (("generate",), ("bench", "speed"), ("bench", "ablation"), ("run",)):
        names = option_names(*path)
        assert {"--context-tokens", "--lookup-tokens"} <= names, path
    assert {"--context-min-ngram", "--lookup-min-ngram"} <= option_names("bench", "ablation")
