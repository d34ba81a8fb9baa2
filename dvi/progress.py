"""The one progress-bar layout every long-running `dvi` command shows on stderr."""

from __future__ import annotations


def progress_bar(console):
    """A rich Progress: description, bar, done/total, elapsed time, and a free `now` field."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[now]}"), console=console,
    )
