"""The Grafana dashboard, generated from the metric catalogue so that the two cannot drift apart.

One row per `MetricSpec.panel` group, one timeseries panel per metric, and an overview row of
stat panels on top. Queries follow the metric kind:

* gauge      `max by (<labels>) (NAME{filters})` (Ray adds `WorkerId`, `NodeAddress`, ... labels;
             aggregating by the catalogue labels keeps one line per actor/version/...)
* counter    `sum by (<labels>) (rate(NAME_total{filters}[$__rate_interval]))`, per second
* histogram  p50/p95/p99 via `histogram_quantile` over `NAME_bucket` rates, plus the mean

`filters` restrict the `actor` and `version` labels to the dashboard variables `$actor` and
`$version`. `via_ray=True` (the service's default) selects the `ray_`-prefixed names Ray's
metrics agent exports; `via_ray=False` the bare names of the `prometheus_client` backend (see
`common.observe.metrics.prometheus_name`).
"""

from __future__ import annotations

import itertools
import json
import re
from urllib.parse import urlparse

from common.core.errors import ServiceError
from common.observe.metrics import METRICS, MetricSpec, get_spec, panel_groups, prometheus_name

DASHBOARD_UID = "dvi-service"
DASHBOARD_TITLE = "DVI service: drafter acceptance and learner drift"

# Dashboard template variables: (name, metric whose label values populate it).
_VARIABLE_SOURCES = {"actor": "dvi_actor_weight_version", "version": "dvi_actor_acceptance_rate"}

# Overview row: (metric, title, aggregation over the metric's series). "increase" sums the
# counter's increase over the dashboard's time range.
_OVERVIEW: tuple[tuple[str, str, str], ...] = (
    ("dvi_learner_weight_version", "Published weight version", "max"),
    ("dvi_actor_tokens_per_second", "Tokens/s, all actors", "sum"),
    ("dvi_actor_tau", "Mean tau", "avg"),
    ("dvi_actor_acceptance_rate", "Mean acceptance rate", "avg"),
    ("dvi_actor_version_lag", "Worst version lag", "max"),
    ("dvi_actor_ar_fallback", "Actors in AR fallback", "sum"),
    ("dvi_drift_rollbacks", "Drift-guard rollbacks", "increase"),
)

_QUANTILES = (0.5, 0.95, 0.99)
_PANEL_W, _PANEL_H = 8, 8  # three panels per 24-column grid row
_STAT_W, _STAT_H = 24 // len(_OVERVIEW), 4


def _selector(spec: MetricSpec, name: str) -> str:
    filters = [f'{label}=~"${label}"' for label in spec.labels if label in _VARIABLE_SOURCES]
    return f"{name}{{{', '.join(filters)}}}" if filters else name


def _agg(op: str, labels: tuple[str, ...], inner: str) -> str:
    """`op by (labels) (inner)`, or `op(inner)` without labels."""
    return f"{op} by ({', '.join(labels)}) ({inner})" if labels else f"{op}({inner})"


def metric_exprs(spec: MetricSpec, via_ray: bool) -> list[tuple[str, str]]:
    """`(legend, PromQL)` pairs drawn in the panel of `spec`; see the module docstring."""
    name = prometheus_name(spec, via_ray)
    legend = " ".join(f"{label}={{{{{label}}}}}" for label in spec.labels) or spec.name.removeprefix("dvi_")
    if spec.kind == "gauge":
        return [(legend, _agg("max", spec.labels, _selector(spec, name)))]

    def rate(series: str) -> str:
        return f"rate({_selector(spec, series)}[$__rate_interval])"

    if spec.kind == "counter":
        return [(legend, _agg("sum", spec.labels, rate(name)))]
    buckets = _agg("sum", ("le", *spec.labels), rate(name + "_bucket"))
    exprs = [(f"p{round(q * 100)} {legend}", f"histogram_quantile({q}, {buckets})") for q in _QUANTILES]
    mean = f"{_agg('sum', spec.labels, rate(name + '_sum'))} / {_agg('sum', spec.labels, rate(name + '_count'))}"
    return exprs + [(f"mean {legend}", mean)]


def _overview_expr(spec: MetricSpec, agg: str, via_ray: bool) -> str:
    name = prometheus_name(spec, via_ray)
    if agg == "increase":
        assert spec.kind == "counter", spec.name
        return f"sum(increase({_selector(spec, name)}[$__range]))"
    assert spec.kind == "gauge" and agg in ("max", "sum", "avg"), (spec.name, agg)
    return f"{agg}({_selector(spec, name)})"


def _title(spec: MetricSpec) -> str:
    words = spec.name.removeprefix("dvi_").replace("_", " ")
    title = words[0].upper() + words[1:]
    return f"{title} (per second)" if spec.kind == "counter" else title


def build_dashboard(via_ray: bool = True) -> dict:
    """The dashboard's Grafana JSON model (a plain dict), built with grafana_foundation_sdk: the
    header and variables, an overview row of stat panels, then one row per metric group."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dash_m

    ds = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
    ids = itertools.count(1)
    board = _with_variables(_header(), ds, via_ray)
    board = _with_overview(board, ds, via_ray, ids)
    board = _with_metric_rows(board, ds, via_ray, ids)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def _header():
    from grafana_foundation_sdk.builders import dashboard as dash_b
    from grafana_foundation_sdk.models import dashboard as dash_m

    return (
        dash_b.Dashboard(DASHBOARD_TITLE)
        .uid(DASHBOARD_UID)
        .description("Generated by `dvi dashboard export` from common/observe/metrics.py; do not edit by hand.")
        .tags(["dvi", "ray", "speculative-decoding"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .with_variable(dash_b.DatasourceVariable("datasource").id("datasource").label("Prometheus").type("prometheus"))
    )


def _with_variables(board, ds, via_ray: bool):
    """The actor/version template variables and the weight-broadcast annotation."""
    from grafana_foundation_sdk.builders import dashboard as dash_b
    from grafana_foundation_sdk.models import dashboard as dash_m

    for var, source in _VARIABLE_SOURCES.items():
        spec = get_spec(source)
        assert var in spec.labels, (var, source)
        board = board.with_variable(
            dash_b.QueryVariable(var).id(var).label(var).datasource(ds)
            .query(f"label_values({prometheus_name(spec, via_ray)}, {var})")
            .multi(True).include_all(True).all_value(".*")
            .sort(dash_m.VariableSort.NUMERICAL_ASC)
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    version_name = prometheus_name(get_spec("dvi_learner_weight_version"), via_ray)
    return board.annotation(
        dash_b.AnnotationQuery().name("Weight broadcasts").datasource(ds).enable(True).icon_color("blue")
        .expr(f"max({version_name}) - max({version_name} offset $__interval) > 0")
    )


def _with_overview(board, ds, via_ray: bool, ids):
    """The "Overview" row: one stat panel per `_OVERVIEW` entry."""
    from grafana_foundation_sdk.builders import common as common_b
    from grafana_foundation_sdk.builders import dashboard as dash_b
    from grafana_foundation_sdk.builders import prometheus, stat

    board = board.with_row(dash_b.Row("Overview").id(next(ids)))
    for name, title, agg in _OVERVIEW:
        spec = get_spec(name)
        board = board.with_panel(
            stat.Panel().id(next(ids)).title(title).description(spec.description).datasource(ds)
            .unit("short" if agg == "increase" else spec.unit).span(_STAT_W).height(_STAT_H)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]))
            .with_target(prometheus.Dataquery().ref_id("A").expr(_overview_expr(spec, agg, via_ray)).instant())
        )
    return board


def _with_metric_rows(board, ds, via_ray: bool, ids):
    """One row per metric group, one time-series panel per metric of the catalogue."""
    from grafana_foundation_sdk.builders import common as common_b
    from grafana_foundation_sdk.builders import dashboard as dash_b
    from grafana_foundation_sdk.builders import prometheus, timeseries
    from grafana_foundation_sdk.models import common as common_m

    for group, specs in panel_groups(METRICS).items():
        board = board.with_row(dash_b.Row(group).id(next(ids)))
        for spec in specs:
            panel = (
                timeseries.Panel().id(next(ids)).title(_title(spec)).description(spec.description).datasource(ds)
                .unit("cps" if spec.kind == "counter" else spec.unit).span(_PANEL_W).height(_PANEL_H)
                .legend(common_b.VizLegendOptions().show_legend(True)
                        .display_mode(common_m.LegendDisplayMode.LIST).placement(common_m.LegendPlacement.BOTTOM))
            )
            if spec.unit == "percentunit":
                panel = panel.min(0).max(1)
            for ref, (legend, expr) in zip("ABCDEFGH", metric_exprs(spec, via_ray)):
                panel = panel.with_target(prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend))
            board = board.with_panel(panel)
    return board


def _all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels nested in collapsed rows
    return panels


def panel_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, then annotations, in order."""
    exprs = [t["expr"] for p in _all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    annotations = dashboard.get("annotations", {}).get("list", [])
    return exprs + [a["expr"] for a in annotations if a.get("expr")]


def push_dashboard(grafana_url: str, token: str, dashboard: dict, folder_uid: str | None = None, timeout: float = 10.0) -> str:
    """Create or overwrite `dashboard` (matched by uid) in Grafana; returns its browser URL.

    `token` is a Grafana service-account token with Editor rights on the target folder. Any
    failure — Grafana unreachable, token rejected, payload refused — raises ServiceError with a
    one-line message naming the URL.
    """
    import niquests
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError

    if not token:
        raise ValueError("a Grafana service-account token is required (--token or GRAFANA_TOKEN)")
    parsed = urlparse(grafana_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--grafana-url must look like http://host:3000, got {grafana_url!r}")
    api = GrafanaApi.from_url(grafana_url, credential=token, timeout=timeout)
    payload: dict = {"dashboard": {**dashboard, "id": None}, "overwrite": True, "message": "dvi dashboard push"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    try:
        response = api.dashboard.update_dashboard(payload)
    except GrafanaUnauthorizedError:
        raise ServiceError(f"Grafana at {grafana_url} rejected the token (401); use a service-account token with Editor role") from None
    except GrafanaClientError as exc:
        raise ServiceError(f"Grafana at {grafana_url} refused the dashboard ({exc.status_code}): {_one_line(exc.message)}") from None
    except GrafanaException as exc:
        raise ServiceError(f"Grafana at {grafana_url} failed: {_one_line(exc.message)}") from None
    except niquests.exceptions.RequestException as exc:
        raise ServiceError(f"cannot reach Grafana at {grafana_url}: {_root_cause(exc)}") from None
    path = response.get("url") if isinstance(response, dict) else None
    if not path:
        raise ServiceError(f"Grafana at {grafana_url} answered without a dashboard url: {_one_line(str(response))}")
    return f"{parsed.scheme}://{parsed.netloc}{path}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _root_cause(exc: BaseException) -> str:
    # urllib3 nests the OS error deep in a long repr; "[Errno 111] Connection refused" is the news.
    text = _one_line(str(exc))
    match = re.search(r"\[Errno -?\d+\] [^'\")]+|Failed to resolve '[^']+'", text)
    return match.group(0).strip() if match else text
