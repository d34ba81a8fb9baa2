"""`dvi monitor`: a live terminal view of a running service, read from Redis (no Grafana needed)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from common.transport.redis.client import DEFAULT_REDIS_URL
from dvi.app import app


@app.command()
def monitor(
    redis_url: str = typer.Option(DEFAULT_REDIS_URL, "--redis-url", envvar="DVI_REDIS_URL", help="Redis the service publishes telemetry to."),
    namespace: str = typer.Option("dvi", "--namespace", help="Key prefix of the service's run."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (for captures and scripts)."),
    refresh: float = typer.Option(2.0, "--refresh", help="Seconds between redraws."),
    history: int = typer.Option(500, "--history", help="History snapshots the sparklines span."),
    width: int = typer.Option(None, "--width", help="Render at this many columns (default: the terminal's)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Also append the history to RUN_DIR/metrics.jsonl (for dvi report)."),
    demo: bool = typer.Option(False, "--demo", help="Show a synthetic run instead of reading Redis."),
) -> None:
    """Watch tau, acceptance, versions, the learner and drift events live; Ctrl-C quits."""
    from rich.console import Console
    from rich.live import Live

    from common.core.errors import ServiceError
    from common.transport.redis.telemetry import RunMetricsWriter, Telemetry
    from dvi.monitor import demo_state, render

    if refresh <= 0:
        raise ValueError(f"--refresh must be > 0 seconds, got {refresh}")
    if history < 1:
        raise ValueError(f"--history must be >= 1, got {history}")
    console = Console(width=width) if width else Console()
    writer = RunMetricsWriter(run_dir) if run_dir is not None else None

    if demo:
        read = demo_state
    else:
        from common.transport.redis.client import connect

        telemetry = Telemetry(connect(redis_url, retries=2, timeout_s=5.0), namespace=namespace)

        def read():
            state = telemetry.read(history=history)
            if writer is not None:
                writer.write(state)
            return state

    state = read()  # an unreachable Redis fails here: one-line error, exit 2
    if once:
        console.print(render(state))
        return
    try:
        with Live(render(state), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(refresh)
                try:
                    state = read()
                    live.update(render(state), refresh=True)
                except ServiceError as err:  # keep the last frame; Redis may come back
                    from rich.console import Group
                    from rich.text import Text

                    live.update(Group(render(state), Text(f"Redis: {err}", style="bold red")), refresh=True)
    except KeyboardInterrupt:
        pass
