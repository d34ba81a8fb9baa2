"""The one progress display every long-running `dvi` command shows on stderr.

On a terminal it is a rich progress bar. Written to a file or a pipe (a benchmark left running
with its output redirected, a CI log), a bar would only appear at the end, so the same calls print
a plain line instead, at most every `LINE_EVERY_S` seconds and at each task's end.
"""

from __future__ import annotations

import time

LINE_EVERY_S = 30.0


def progress_bar(console):
    """A context manager with rich Progress's `add_task(description, total=, now=)` and
    `update(task, advance=, completed=, description=, now=)`: a bar on a terminal, lines elsewhere."""
    if not console.is_terminal:
        return LineProgress(console)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[now]}"), console=console,
    )


class LineProgress:
    """Progress as plain lines: `description done/total (elapsed s) now`."""

    def __init__(self, console, every_s: float = LINE_EVERY_S):
        self.console = console
        self.every_s = every_s
        self.tasks: list[dict] = []

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int | None = None, completed: int = 0, now: str = "") -> int:
        start = time.monotonic()
        self.tasks.append({"description": description, "total": total, "completed": completed, "now": now,
                           "started": start, "printed": start})
        return len(self.tasks) - 1

    def update(self, task: int, advance: int = 0, completed: int | None = None, description: str | None = None,
               now: str | None = None) -> None:
        t = self.tasks[task]
        t["completed"] = completed if completed is not None else t["completed"] + advance
        if description is not None:
            t["description"] = description
        if now is not None:
            t["now"] = now
        clock = time.monotonic()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished or clock - t["printed"] >= self.every_s:
            t["printed"] = clock
            total = "?" if t["total"] is None else t["total"]
            self.console.print(f"{t['description']} {t['completed']}/{total} ({clock - t['started']:.0f} s) {t['now']}",
                               highlight=False)
