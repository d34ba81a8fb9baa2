"""The one catalogue of every metric the service exports, and a thin exporter.

`METRICS` is the single source of truth: the generation actors and the learner record only names
listed here, the Grafana dashboard (`dvi/dashboard.py`) is generated from it, and the terminal
view reads `MetricsRecorder.snapshot()`. Words (drafter, verifier, tau, weight version, ...) as
common/core/vocabulary.py defines them.

Names as Prometheus sees them
-----------------------------
A spec's `name` (always `dvi_...`) is what code records. The series a PromQL query selects
differs in two ways, both computed by `prometheus_name`:

* Ray's metrics agent prefixes every application metric with `ray_` (its Prometheus namespace),
  so `dvi_actor_tau` recorded through `ray.util.metrics` is scraped as `ray_dvi_actor_tau`.
  The `prometheus_client` backend exports the bare name.
* Counters are exposed with a `_total` suffix by both backends (OpenMetrics convention), so
  counter names in the catalogue never end in `_total` themselves. Histograms expose
  `<name>_bucket`, `<name>_sum` and `<name>_count`.

Ray also attaches its own labels (`WorkerId`, `NodeAddress`, `SessionName`, ...); the dashboard
aggregates `by (<catalogue labels>)` so those never split a panel.

Counters of rare events (rollbacks, skipped steps, dead letters) are created at 0 with
`inc(name, 0, labels)` when their process starts, on both backends, so a healthy run's panels
show 0 rather than "no data".

Cardinality: label values are free strings, so keep them bounded — `actor` is the actor index,
`position` is a draft position `0..gamma_max-1`, `version` is a weight version. Only the
per-version drift signals and the per-actor tau / acceptance carry `version`. A gauge that
several actors set carries `actor` too (`dvi_drift_acceptance_ema`): under `prometheus_client`
the series would otherwise be one value overwritten by whichever actor reported last.

Lifetimes differ by backend. Through Ray, a gauge series vanishes from the scrape about 20-25 s
after its last `set()` (measured with Ray 2.60: the node agent keeps a gauge for two export
intervals after the worker stops reporting it), so a process must re-report gauges that change
rarely (weight version, gamma, fallback flag): call `republish()` from its reporting loop.
Superseded series (a tau under an old weight version) then age out by themselves once
`forget()` drops them from the recorder. Through `prometheus_client` a series stays until
`forget()` removes it. Ray rebuilds histograms from bucket counts, so `_sum` (and a mean derived
from it) is approximate there (bucket midpoints); quantiles are unaffected.

The catalogue itself imports nothing beyond the standard library; Ray and `prometheus_client` are
imported inside the exporter backends only.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Literal

MetricKind = Literal["gauge", "counter", "histogram"]

_NAME_RE = re.compile(r"^dvi_[a-z0-9_]+$")
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# Labels Prometheus reserves for histograms/summaries, or that Ray sets on every series.
_RESERVED_LABELS = frozenset({"le", "quantile", "job", "instance"})

# Learner step time and trajectory age span milliseconds to minutes.
_STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_AGE_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: what code records; `dvi_` + lowercase snake case; counters never end in `_total`.
        kind: "gauge" (last value), "counter" (monotonic total) or "histogram" (distribution).
        description: one line shown as the Prometheus HELP text and the panel description.
        labels: label keys every record must set, exactly these, in this order.
        panel: the dashboard row this metric is drawn in.
        unit: Grafana unit id for the panel axis ("s", "percentunit", "short", "none", ...).
        buckets: histogram upper bounds, strictly increasing and > 0 (Ray requires positive
            bounds); empty for gauges and counters.
    """

    name: str
    kind: MetricKind
    description: str
    labels: tuple[str, ...]
    panel: str
    unit: str
    buckets: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"metric name {self.name!r} must match {_NAME_RE.pattern}")
        if self.kind not in ("gauge", "counter", "histogram"):
            raise ValueError(f"metric {self.name}: kind {self.kind!r} is not gauge|counter|histogram")
        if self.kind == "counter" and self.name.endswith("_total"):
            raise ValueError(f"counter {self.name}: drop the '_total' suffix, exporters add it")
        if not isinstance(self.labels, tuple) or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"metric {self.name}: labels must be a tuple of distinct keys, got {self.labels!r}")
        for label in self.labels:
            if not _LABEL_RE.match(label) or label in _RESERVED_LABELS:
                raise ValueError(f"metric {self.name}: label {label!r} is invalid or reserved")
        if not self.description or not self.panel or not self.unit:
            raise ValueError(f"metric {self.name}: description, panel and unit must be non-empty")
        if self.kind == "histogram":
            b = self.buckets
            if not b or any(x <= 0 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"histogram {self.name}: buckets must be positive and increasing, got {b!r}")
        elif self.buckets:
            raise ValueError(f"{self.kind} {self.name}: only histograms take buckets")


def _g(name: str, description: str, labels: tuple[str, ...], panel: str, unit: str) -> MetricSpec:
    return MetricSpec(name, "gauge", description, labels, panel, unit)


def _c(name: str, description: str, labels: tuple[str, ...], panel: str, unit: str = "short") -> MetricSpec:
    return MetricSpec(name, "counter", description, labels, panel, unit)


_A = ("actor",)
_AV = ("actor", "version")

# Dashboard rows, top to bottom.
PANEL_GENERATION = "Generation"
PANEL_ACCEPTANCE = "Acceptance"
PANEL_ADAPTER = "Adapter versions"
PANEL_LOSSES = "Learner losses"
PANEL_SCHEDULE = "Learner schedule"
PANEL_LEARNER = "Learner throughput"
PANEL_STREAM = "Trajectory stream"
PANEL_DRIFT = "Drift"

METRICS: tuple[MetricSpec, ...] = (
    # --- per generation actor -------------------------------------------------------------
    _g("dvi_actor_tokens_per_second", "Generated tokens per second over the last reporting window.", _A, PANEL_GENERATION, "short"),
    _c("dvi_actor_requests_served", "Requests completed by the actor.", _A, PANEL_GENERATION),
    _c("dvi_actor_tokens_generated", "Tokens emitted by the actor (accepted + recovered + bonus).", _A, PANEL_GENERATION),
    _g("dvi_actor_gamma", "Draft length gamma used for the latest verifier pass.", _A, PANEL_GENERATION, "none"),
    _g("dvi_actor_ar_fallback", "1 while the actor decodes autoregressively with the verifier only (drafting disabled), else 0.", _A, PANEL_GENERATION, "none"),
    _g("dvi_actor_tau", "Mean tokens accepted per verifier pass (tau) under this weight version.", _AV, PANEL_ACCEPTANCE, "none"),
    _g("dvi_actor_acceptance_rate", "Fraction of the exit head's drafted tokens the verifier accepted under this weight version.", _AV, PANEL_ACCEPTANCE, "percentunit"),
    _g("dvi_actor_context_acceptance_rate", "Fraction of context-drafted tokens (prompt lookup) the verifier accepted in the latest request.", _A, PANEL_ACCEPTANCE, "percentunit"),
    _g("dvi_actor_traffic_acceptance_rate", "Fraction of the tokens drafted from earlier requests' n-grams (traffic drafting) the verifier accepted in the latest request.", _A, PANEL_ACCEPTANCE, "percentunit"),
    _g("dvi_actor_traffic_ngrams", "N-grams held in the actor's traffic index (what followed them in the requests it served), after the latest request.", _A, PANEL_GENERATION, "short"),
    _g("dvi_actor_acceptance_rate_by_position", "Acceptance rate of the draft token at 0-based position `position`, given the earlier ones were accepted.", ("actor", "position"), PANEL_ACCEPTANCE, "percentunit"),
    _g("dvi_actor_weight_version", "Weight version of the LoRA adapter the actor's drafter is using.", _A, PANEL_ADAPTER, "none"),
    _g("dvi_actor_version_lag", "Learner's published weight version minus the actor's.", _A, PANEL_ADAPTER, "none"),
    _c("dvi_actor_rollbacks", "Times the actor swapped back to an earlier weight version.", _A, PANEL_ADAPTER),
    _g("dvi_actor_redis_up", "1 while the actor's last Redis command succeeded, 0 while Redis is unreachable (the actor serves on).", _A, PANEL_STREAM, "none"),
    _g("dvi_actor_outbox", "Trajectories held in the actor's local outbox, not yet taken by Redis.", _A, PANEL_STREAM, "short"),
    _c("dvi_actor_trajectories_lost", "Trajectories the actor dropped because its outbox was full while Redis was away.", _A, PANEL_STREAM),
    # --- learner ----------------------------------------------------------------------------
    _g("dvi_learner_kl", "KL(verifier || drafter) distillation loss of the latest step.", (), PANEL_LOSSES, "none"),
    _g("dvi_learner_ce", "Cross-entropy of the drafter on verifier tokens in the latest step.", (), PANEL_LOSSES, "none"),
    _g("dvi_learner_pg_loss", "Policy-gradient loss on acceptance rewards in the latest step.", (), PANEL_LOSSES, "none"),
    _g("dvi_learner_entropy", "Mean entropy of the drafter's next-token distribution in the latest step.", (), PANEL_LOSSES, "none"),
    _g("dvi_learner_grad_norm", "Global gradient norm of the LoRA parameters before clipping.", (), PANEL_LOSSES, "none"),
    _g("dvi_learner_schedule_phase", "1 for the schedule phase the learner is in (e.g. kl, mixed, rl), 0 for the others.", ("phase",), PANEL_SCHEDULE, "none"),
    _g("dvi_learner_schedule_weight", "Weight of each loss term (label `term`: kl, ce, pg, entropy) in the current step.", ("term",), PANEL_SCHEDULE, "none"),
    _c("dvi_learner_skipped_steps", "Optimizer steps skipped because the loss or gradient was not finite.", (), PANEL_SCHEDULE),
    MetricSpec("dvi_learner_step_seconds", "histogram", "Wall time of one learner step (batch assembly, forward, backward, optimizer).", (), PANEL_LEARNER, "s", _STEP_SECONDS_BUCKETS),
    _g("dvi_learner_trajectories_per_second", "Trajectories consumed by the learner per second.", (), PANEL_LEARNER, "short"),
    _g("dvi_learner_weight_version", "Latest weight version the learner has published.", (), PANEL_LEARNER, "none"),
    _g("dvi_stream_length", "Entries in the trajectory Redis stream (XLEN).", ("stream",), PANEL_STREAM, "short"),
    _g("dvi_stream_pending", "Entries delivered to the learner's consumer group but not yet acknowledged (XPENDING).", ("stream",), PANEL_STREAM, "short"),
    MetricSpec("dvi_learner_trajectory_age_seconds", "histogram", "Seconds between a trajectory's creation on an actor and its use by the learner.", (), PANEL_STREAM, "s", _AGE_SECONDS_BUCKETS),
    _c("dvi_learner_trajectories_dropped", "Trajectories trimmed from the stream (drop-oldest backpressure) before the learner read them.", (), PANEL_STREAM),
    _g("dvi_learner_redis_up", "1 while the learner's last Redis command succeeded, 0 while it waits for Redis.", (), PANEL_STREAM, "none"),
    _c("dvi_learner_trajectories_lost", "Trajectories missing from their producer's numbering (trimmed, lost in a Redis crash, or dropped from a full outbox).", (), PANEL_STREAM),
    _c("dvi_learner_trajectories_stale", "Trajectories discarded because their weight version lagged more than the staleness limit.", (), PANEL_STREAM),
    _c("dvi_learner_trajectories_dead_lettered", "Trajectories moved to the dead-letter stream (undecodable, oversized, malformed, or refused by the learner).", (), PANEL_STREAM),
    # --- drift signals ---------------------------------------------------------------------
    _g("dvi_drift_acceptance_ema", "Acceptance-rate EMA of the actor's drift guard under this weight version (the baseline a new version is judged against).", _AV, PANEL_DRIFT, "percentunit"),
    _g("dvi_drift_kl_slope", "Least-squares slope of the learner KL over its recent window, per step (> 0: drifting apart).", (), PANEL_DRIFT, "none"),
    _g("dvi_drift_broadcast_acceptance_delta", "Acceptance EMA under this weight version minus that under the previous one (max over actors).", ("version",), PANEL_DRIFT, "percentunit"),
    _c("dvi_drift_rollbacks", "Drift-guard rollbacks, labelled with the weight version that was rolled back.", ("version",), PANEL_DRIFT),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}
assert len(METRICS_BY_NAME) == len(METRICS), "duplicate metric name in METRICS"


def get_spec(name: str) -> MetricSpec:
    """The catalogue entry for `name`; ValueError naming the metric if there is none."""
    try:
        return METRICS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}: not in common.observe.metrics.METRICS") from None


def panel_groups(metrics: tuple[MetricSpec, ...] = METRICS) -> dict[str, list[MetricSpec]]:
    """Metrics grouped by `panel`, groups and members in catalogue order."""
    groups: dict[str, list[MetricSpec]] = {}
    for m in metrics:
        groups.setdefault(m.panel, []).append(m)
    return groups


def prometheus_name(spec: MetricSpec, via_ray: bool) -> str:
    """The metric name a PromQL query selects for `spec`.

    `ray_` is prepended when the value is exported through `ray.util.metrics` (Ray's metrics
    agent namespace); counters get `_total`. For histograms this is the family name: select
    `<name>_bucket`, `<name>_sum` or `<name>_count`.
    """
    base = f"ray_{spec.name}" if via_ray else spec.name
    return f"{base}_total" if spec.kind == "counter" else base


def _ray_worker_active() -> bool:
    # Never import Ray just to ask: if nothing imported it, this process is not a Ray worker.
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class _RayBackend:
    """Records through `ray.util.metrics`; Ray's per-node agent serves them to Prometheus."""

    def __init__(self) -> None:
        from ray.util import metrics as ray_metrics

        self._ray_metrics = ray_metrics
        self._instruments: dict[str, object] = {}

    def _instrument(self, spec: MetricSpec):
        inst = self._instruments.get(spec.name)
        if inst is None:
            rm = self._ray_metrics
            if spec.kind == "gauge":
                inst = rm.Gauge(spec.name, spec.description, tag_keys=spec.labels)
            elif spec.kind == "counter":
                inst = rm.Counter(spec.name, spec.description, tag_keys=spec.labels)
            else:
                inst = rm.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.labels)
            self._instruments[spec.name] = inst
        return inst

    def forget(self, spec: MetricSpec, labels: dict[str, str]) -> None:
        pass  # Ray cannot delete a series; it expires once no longer re-published

    def record(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        inst = self._instrument(spec)
        if spec.kind == "gauge":
            inst.set(value, tags=labels)
        elif spec.kind == "counter":
            if value > 0:
                inst.inc(value, tags=labels)
            else:  # inc(0) creates the series at 0; Ray's public inc() refuses 0, so record the
                # point the way inc() itself does (measured: exported as `..._total 0.0`)
                inst._record(0.0, tags=labels)
        else:
            inst.observe(value, tags=labels)

    def close(self) -> None:
        pass


class _PrometheusBackend:
    """Records through `prometheus_client` into a private registry served over HTTP.

    Instruments are registered on first record, so a process exports only what it records (an
    unlabelled gauge would otherwise be scraped as 0 from every process).
    """

    def __init__(self, port: int, addr: str) -> None:
        import prometheus_client as pc

        self._pc = pc
        self._registry = pc.CollectorRegistry(auto_describe=True)
        self._instruments: dict[str, object] = {}
        self._server, self._thread = pc.start_http_server(port, addr=addr, registry=self._registry)
        self.port: int = self._server.server_port

    def _instrument(self, spec: MetricSpec):
        inst = self._instruments.get(spec.name)
        if inst is None:
            pc, reg = self._pc, self._registry
            # No `unit=`: prometheus_client would append it to the name and break prometheus_name.
            if spec.kind == "gauge":
                inst = pc.Gauge(spec.name, spec.description, spec.labels, registry=reg)
            elif spec.kind == "counter":
                inst = pc.Counter(spec.name, spec.description, spec.labels, registry=reg)
            else:
                inst = pc.Histogram(spec.name, spec.description, spec.labels, registry=reg, buckets=spec.buckets)
            self._instruments[spec.name] = inst
        return inst

    def forget(self, spec: MetricSpec, labels: dict[str, str]) -> None:
        inst = self._instruments.get(spec.name)
        if inst is None:
            return
        if spec.labels:
            inst.remove(*(labels[k] for k in spec.labels))
        else:  # an unlabelled metric is one series: unregister it
            self._registry.unregister(inst)
            del self._instruments[spec.name]

    def record(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        inst = self._instrument(spec)
        child = inst.labels(**labels) if spec.labels else inst
        if spec.kind == "gauge":
            child.set(value)
        elif spec.kind == "counter":
            child.inc(value)
        else:
            child.observe(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MetricsRecorder:
    """Records catalogue metrics, exports them, and keeps the latest values in memory.

    Backend choice (`backend="auto"`): inside a process where Ray is initialised (an actor, a
    task or the driver), values go through `ray.util.metrics` and reach Prometheus via the node's
    metrics agent (`ray start --metrics-export-port`); otherwise, when `port` is given, a
    `prometheus_client` HTTP server is started on `addr:port` (0 picks a free port, see
    `self.port`); otherwise values are kept in memory only. Force one with
    `backend="ray" | "prometheus" | "memory"`.

    Every record is validated against `METRICS` before anything is exported: an unknown name, a
    label set that differs from the spec's, the wrong verb for the kind, a non-numeric value, or
    a negative counter increment raises ValueError. Thread-safe.

    Under Ray, call `republish()` at least every ~10 s (gauges expire otherwise) and `forget()`
    series whose label values are superseded, e.g. `{"actor": a, "version": old}` after a swap.
    """

    def __init__(
        self,
        port: int | None = None,
        addr: str = "0.0.0.0",
        backend: Literal["auto", "ray", "prometheus", "memory"] = "auto",
    ) -> None:
        if backend == "auto":
            backend = "ray" if _ray_worker_active() else ("prometheus" if port is not None else "memory")
        if backend == "prometheus" and port is None:
            raise ValueError("backend='prometheus' needs a port (0 picks a free one)")
        if backend not in ("ray", "prometheus", "memory"):
            raise ValueError(f"backend must be auto|ray|prometheus|memory, got {backend!r}")
        self.backend: str = backend
        self._lock = threading.Lock()
        # name -> label-values tuple -> entry; entries hold "labels", "value" (+ "count", "sum").
        self._latest: dict[str, dict[tuple[str, ...], dict]] = {}
        self._exporter: _RayBackend | _PrometheusBackend | None = None
        self.port: int | None = None
        if backend == "ray":
            self._exporter = _RayBackend()
        elif backend == "prometheus":
            self._exporter = _PrometheusBackend(port, addr)
            self.port = self._exporter.port

    # --- recording verbs, one per kind -------------------------------------------------------
    def set(self, name: str, value: float, labels: dict[str, object] | None = None) -> None:
        """Set gauge `name` to `value` for this label set."""
        self._record("gauge", name, value, labels)

    def inc(self, name: str, value: float = 1.0, labels: dict[str, object] | None = None) -> None:
        """Add `value` (>= 0) to counter `name` for this label set; `inc(name, 0, labels)` creates
        the series at 0 (a panel then shows 0 rather than no data)."""
        self._record("counter", name, value, labels)

    def observe(self, name: str, value: float, labels: dict[str, object] | None = None) -> None:
        """Add one observation `value` to histogram `name` for this label set."""
        self._record("histogram", name, value, labels)

    def republish(self) -> int:
        """Re-send the latest value of every gauge series to the exporter; returns how many.

        Keeps rarely-changing gauges alive under Ray's gauge expiry (see the module docstring).
        Counters and histograms are cumulative and need no refresh; the snapshot is unchanged.
        """
        with self._lock:
            gauges = [
                (METRICS_BY_NAME[name], entry)
                for name, series in self._latest.items()
                if METRICS_BY_NAME[name].kind == "gauge"
                for entry in series.values()
            ]
            if self._exporter is not None:
                for spec, entry in gauges:
                    self._exporter.record(spec, entry["value"], entry["labels"])
        return len(gauges)

    def forget(self, name: str, labels: dict[str, object] | None = None) -> bool:
        """Drop one series (e.g. tau under a superseded weight version) from the snapshot,
        from `republish()`, and from the prometheus_client scrape; returns whether it existed.

        Under Ray the series then expires by itself. Labels are validated like a record's.
        """
        spec = get_spec(name)
        str_labels = _check_labels(spec, labels or {})
        key = tuple(str_labels[k] for k in spec.labels)
        with self._lock:
            series = self._latest.get(name, {})
            if key not in series:
                return False
            del series[key]
            if not series:
                del self._latest[name]
            if self._exporter is not None:
                self._exporter.forget(spec, str_labels)
        return True

    def snapshot(self) -> dict[str, list[dict]]:
        """Latest values, JSON-serialisable, for mirroring to Redis and the terminal view.

        `{name: [{"labels": {key: str}, "value": float, ...}, ...]}` holding only metrics recorded
        so far. Gauges: the last value set. Counters: the running total since this recorder was
        created. Histograms: `value` is the last observation, plus `count` and `sum`.
        """
        with self._lock:
            return {
                name: [dict(entry, labels=dict(entry["labels"])) for entry in series.values()]
                for name, series in self._latest.items()
            }

    def close(self) -> None:
        """Stop the HTTP server of the prometheus backend; a no-op for the others."""
        if self._exporter is not None:
            self._exporter.close()

    def __enter__(self) -> MetricsRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------
    def _record(self, verb_kind: str, name: str, value: float, labels: dict[str, object] | None) -> None:
        spec = get_spec(name)
        if spec.kind != verb_kind:
            verb = {"gauge": "set", "counter": "inc", "histogram": "observe"}[spec.kind]
            raise ValueError(f"metric {name} is a {spec.kind}: record it with {verb}()")
        str_labels = _check_labels(spec, labels or {})
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {name}: value must be a number, got {value!r}")
        value = float(value)
        if spec.kind == "counter" and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"counter {name}: increment must be finite and >= 0, got {value}")
        key = tuple(str_labels[k] for k in spec.labels)
        with self._lock:
            series = self._latest.setdefault(name, {})
            entry = series.get(key)
            if entry is None:
                entry = {"labels": str_labels, "value": 0.0}
                if spec.kind == "histogram":
                    entry.update(count=0, sum=0.0)
                series[key] = entry
            if spec.kind == "counter":
                entry["value"] += value
            else:
                entry["value"] = value
            if spec.kind == "histogram":
                entry["count"] += 1
                entry["sum"] += value
            if self._exporter is not None:
                self._exporter.record(spec, value, str_labels)


def _check_labels(spec: MetricSpec, labels: dict[str, object]) -> dict[str, str]:
    if set(labels) != set(spec.labels):
        missing = sorted(set(spec.labels) - set(labels))
        extra = sorted(set(labels) - set(spec.labels))
        raise ValueError(
            f"metric {spec.name} takes labels {list(spec.labels)}; missing {missing}, unexpected {extra}"
        )
    return {k: str(labels[k]) for k in spec.labels}
