"""`dvi report RUN_DIR`: PNG plots and a markdown summary of a run's metrics history."""

from __future__ import annotations

from pathlib import Path

import typer

from dvi.app import app


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run directory holding metrics.jsonl (and summary.json, events.jsonl)."),
) -> None:
    """Write RUN_DIR/report/*.png (tau, acceptance, KL, versions, throughput) and RUN_DIR/report/report.md."""
    from dvi.report import build_report

    result = build_report(run_dir)
    for path in result.plots:
        typer.echo(f"wrote {path}")
    typer.echo(f"wrote {result.markdown}")
