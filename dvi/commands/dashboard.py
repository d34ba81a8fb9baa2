"""`dvi dashboard export|push`: the Grafana dashboard generated from common/observe/metrics.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from dvi.app import app

dashboard_app = typer.Typer(no_args_is_help=True, help="Grafana dashboard of the service's Prometheus metrics.")
app.add_typer(dashboard_app, name="dashboard")

_VIA_RAY_HELP = (
    "Query the ray_-prefixed names Ray's metrics agent exports (the service's default); "
    "--direct for a process exporting with prometheus_client."
)


@dashboard_app.command("export")
def export(
    out: Path | None = typer.Option(None, "--out", help="Write the JSON model here instead of stdout."),
    via_ray: bool = typer.Option(True, "--via-ray/--direct", help=_VIA_RAY_HELP),
) -> None:
    """Print the dashboard's Grafana JSON model (import it in Grafana or keep it under version control)."""
    from dvi.dashboard import build_dashboard

    text = json.dumps(build_dashboard(via_ray=via_ray), indent=2, sort_keys=True)
    if out is None:
        typer.echo(text)
    else:
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)


@dashboard_app.command("push")
def push(
    grafana_url: str = typer.Option(..., "--grafana-url", envvar="GRAFANA_URL", help="e.g. http://grafana:3000"),
    token: str = typer.Option(..., "--token", envvar="GRAFANA_TOKEN", help="Service-account token (Editor role)."),
    folder_uid: str | None = typer.Option(None, "--folder-uid", help="Grafana folder to put the dashboard in."),
    via_ray: bool = typer.Option(True, "--via-ray/--direct", help=_VIA_RAY_HELP),
) -> None:
    """Create or overwrite the dashboard in Grafana and print its URL."""
    from dvi.dashboard import build_dashboard, push_dashboard

    typer.echo(push_dashboard(grafana_url, token, build_dashboard(via_ray=via_ray), folder_uid=folder_uid))
