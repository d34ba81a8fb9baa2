"""The Grafana dashboard is generated from the metric catalogue and nothing else."""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from common.core.errors import ServiceError
from common.observe.metrics import METRICS, panel_groups, prometheus_name
from dvi.cli import main
from dvi.dashboard import build_dashboard, panel_queries, push_dashboard

_NAME_RE = re.compile(r"\b((?:ray_)?dvi_[a-z0-9_]+)")


def _series_to_metric(via_ray: bool) -> dict[str, str]:
    """Every series name a query may select -> the catalogue metric it belongs to."""
    allowed = {}
    for spec in METRICS:
        base = prometheus_name(spec, via_ray)
        suffixes = ("_bucket", "_sum", "_count") if spec.kind == "histogram" else ("",)
        allowed.update({base + s: spec.name for s in suffixes})
    return allowed


def _panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


@pytest.mark.parametrize("via_ray", [True, False])
def test_queries_and_catalogue_match_both_ways(via_ray):
    allowed = _series_to_metric(via_ray)
    queries = panel_queries(build_dashboard(via_ray=via_ray))
    referenced = {name for q in queries for name in _NAME_RE.findall(q)}
    assert referenced, "no metric names parsed"
    unknown = referenced - set(allowed)
    assert not unknown, f"queries reference series outside the catalogue: {sorted(unknown)}"
    covered = {allowed[name] for name in referenced}
    assert covered == {m.name for m in METRICS}
    if via_ray:
        assert all(name.startswith("ray_") for name in referenced)


def test_each_metric_has_its_own_panel_with_kind_specific_queries():
    dashboard = build_dashboard()
    by_description = {p["description"]: p for p in _panels(dashboard) if p["type"] == "timeseries"}
    for spec in METRICS:
        panel = by_description[spec.description]
        exprs = [t["expr"] for t in panel["targets"]]
        name = prometheus_name(spec, via_ray=True)
        if spec.kind == "gauge":
            head = f"max by ({', '.join(spec.labels)}) (" if spec.labels else "max("
            assert len(exprs) == 1 and exprs[0].startswith(head + name) and "rate(" not in exprs[0]
        elif spec.kind == "counter":
            assert len(exprs) == 1 and "rate(" in exprs[0] and exprs[0].count(name) == 1
            assert panel["fieldConfig"]["defaults"]["unit"] == "cps"
        else:
            quantiles = [e for e in exprs if e.startswith("histogram_quantile(")]
            assert [e.split(",")[0] for e in quantiles] == ["histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99"]
            assert all(f"rate({name}_bucket[$__rate_interval])" in e and "by (le)" in e for e in quantiles)
        if "actor" in spec.labels:
            assert all('actor=~"$actor"' in e for e in exprs)
        if "version" in spec.labels:
            assert all('version=~"$version"' in e for e in exprs)
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    # the timeseries panels are grouped in one row per panel group, in catalogue order
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", *panel_groups()]


def test_dashboard_json_model_and_template_variables():
    dashboard = json.loads(json.dumps(build_dashboard()))
    assert dashboard["uid"] == "dvi-service" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for label in ("actor", "version"):
        var = variables[label]
        assert var["type"] == "query" and var["includeAll"] and var["multi"] and var["allValue"] == ".*"
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"])
        assert match and match.group(2) == label
        spec = {prometheus_name(m, via_ray=True): m for m in METRICS}[match.group(1)]
        assert label in spec.labels
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0


def test_cli_export_prints_the_json_model(capsys, tmp_path):
    assert main(["dashboard", "export"]) == 0
    assert json.loads(capsys.readouterr().out) == build_dashboard(via_ray=True)

    assert main(["dashboard", "export", "--direct"]) == 0
    assert "ray_dvi_" not in capsys.readouterr().out

    out = tmp_path / "dash.json"
    assert main(["dashboard", "export", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads(out.read_text())["uid"] == "dvi-service"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_to_unreachable_grafana_is_a_one_line_service_error(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServiceError, match=f"cannot reach Grafana at {url}"):
        push_dashboard(url, "tok", build_dashboard(), timeout=2.0)
    assert main(["dashboard", "push", "--grafana-url", url, "--token", "tok"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach Grafana at {url}") and err.count("\n") == 1


class _FakeGrafana(BaseHTTPRequestHandler):
    """Grafana's POST /api/dashboards/db: 200 with the dashboard url, or 401 for a wrong token."""

    received: list[tuple[str, str, dict]] = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append((self.path, self.headers.get("Authorization", ""), body))
        if self.headers.get("Authorization") != "Bearer good-token":
            status, reply = 401, {"message": "invalid API key"}
        else:
            uid = body["dashboard"]["uid"]
            status, reply = 200, {"id": 7, "uid": uid, "url": f"/d/{uid}/dvi-service", "status": "success", "version": 1}
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_grafana():
    _FakeGrafana.received = []
    server = HTTPServer(("127.0.0.1", 0), _FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_push_overwrites_by_uid_and_returns_the_url(fake_grafana):
    dashboard = build_dashboard()
    url = push_dashboard(fake_grafana, "good-token", dashboard, folder_uid="ops")
    assert url == f"{fake_grafana}/d/dvi-service/dvi-service"
    ((path, auth, body),) = _FakeGrafana.received
    assert path == "/api/dashboards/db" and auth == "Bearer good-token"
    assert body["overwrite"] is True and body["folderUid"] == "ops"
    assert body["dashboard"]["id"] is None and body["dashboard"]["uid"] == "dvi-service"
    assert body["dashboard"]["panels"] == dashboard["panels"]


def test_push_with_a_rejected_token_is_a_service_error(fake_grafana, capsys):
    with pytest.raises(ServiceError, match="rejected the token"):
        push_dashboard(fake_grafana, "bad-token", build_dashboard())
    assert main(["dashboard", "push", "--grafana-url", fake_grafana, "--token", "bad-token"]) == 2
    assert "rejected the token" in capsys.readouterr().err
    with pytest.raises(ValueError, match="token is required"):
        push_dashboard(fake_grafana, "", build_dashboard())
