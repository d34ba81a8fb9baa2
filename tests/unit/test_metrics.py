"""The metric catalogue and the recorder: validation, snapshot, and the prometheus_client backend."""

from __future__ import annotations

import json
import re
import sys
import urllib.request

import pytest

from common.observe.metrics import (
    METRICS,
    METRICS_BY_NAME,
    MetricSpec,
    MetricsRecorder,
    get_spec,
    panel_groups,
    prometheus_name,
)


def test_catalogue_covers_the_required_signals():
    names = set(METRICS_BY_NAME)
    for required in (
        "dvi_actor_tokens_per_second", "dvi_actor_tau", "dvi_actor_acceptance_rate", "dvi_actor_context_acceptance_rate",
        "dvi_actor_traffic_acceptance_rate", "dvi_actor_traffic_ngrams",
        "dvi_actor_acceptance_rate_by_position", "dvi_actor_gamma", "dvi_actor_weight_version",
        "dvi_actor_version_lag", "dvi_actor_requests_served", "dvi_actor_tokens_generated",
        "dvi_actor_ar_fallback", "dvi_actor_rollbacks",
        "dvi_learner_kl", "dvi_learner_ce", "dvi_learner_pg_loss", "dvi_learner_entropy",
        "dvi_learner_schedule_phase", "dvi_learner_schedule_weight", "dvi_learner_grad_norm",
        "dvi_learner_step_seconds", "dvi_learner_trajectories_per_second", "dvi_stream_length",
        "dvi_stream_pending", "dvi_learner_trajectory_age_seconds", "dvi_learner_trajectories_dropped",
        "dvi_learner_trajectories_stale", "dvi_learner_trajectories_dead_lettered",
        "dvi_learner_skipped_steps", "dvi_learner_weight_version",
        "dvi_drift_acceptance_ema", "dvi_drift_kl_slope", "dvi_drift_broadcast_acceptance_delta",
        "dvi_drift_rollbacks",
    ):
        assert required in names, required
    assert get_spec("dvi_actor_acceptance_rate_by_position").labels == ("actor", "position")
    assert get_spec("dvi_drift_acceptance_ema").labels == ("actor", "version")  # every actor sets it
    assert get_spec("dvi_learner_schedule_weight").labels == ("term",)
    assert all(m.labels[0] == "actor" for m in METRICS if m.name.startswith("dvi_actor_"))
    # panel_groups keeps every metric exactly once
    assert sorted(m.name for g in panel_groups().values() for m in g) == sorted(names)


def test_prometheus_name_prefix_and_suffix():
    # Ray's agent exports under namespace "ray"; counters carry the OpenMetrics _total suffix.
    assert prometheus_name(get_spec("dvi_actor_tau"), via_ray=True) == "ray_dvi_actor_tau"
    assert prometheus_name(get_spec("dvi_actor_tau"), via_ray=False) == "dvi_actor_tau"
    assert prometheus_name(get_spec("dvi_actor_rollbacks"), via_ray=True) == "ray_dvi_actor_rollbacks_total"
    assert prometheus_name(get_spec("dvi_actor_rollbacks"), via_ray=False) == "dvi_actor_rollbacks_total"
    assert prometheus_name(get_spec("dvi_learner_step_seconds"), via_ray=False) == "dvi_learner_step_seconds"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="tau"), "must match"),
        (dict(kind="summary"), "kind"),
        (dict(kind="counter", name="dvi_x_total"), "_total"),
        (dict(labels=("le",)), "reserved"),
        (dict(labels=("actor", "actor")), "distinct"),
        (dict(kind="histogram"), "buckets"),
        (dict(kind="histogram", buckets=(1.0, 0.5)), "buckets"),
        (dict(buckets=(1.0,)), "only histograms"),
    ],
)
def test_metric_spec_rejects_bad_definitions(kwargs, match):
    base = dict(name="dvi_x", kind="gauge", description="d", labels=(), panel="p", unit="none")
    with pytest.raises(ValueError, match=match):
        MetricSpec(**{**base, **kwargs})


def test_recorder_rejects_unknown_names_labels_and_verbs():
    rec = MetricsRecorder(backend="memory")
    with pytest.raises(ValueError, match="unknown metric 'dvi_nope'"):
        rec.set("dvi_nope", 1.0)
    with pytest.raises(ValueError, match=r"missing \['version'\]"):
        rec.set("dvi_actor_tau", 2.0, {"actor": 0})
    with pytest.raises(ValueError, match=r"unexpected \['gpu'\]"):
        rec.set("dvi_actor_gamma", 4, {"actor": 0, "gpu": 1})
    with pytest.raises(ValueError, match="unexpected"):
        rec.set("dvi_learner_kl", 0.1, {"actor": 0})
    with pytest.raises(ValueError, match=r"counter: record it with inc\(\)"):
        rec.set("dvi_actor_rollbacks", 1, {"actor": 0})
    with pytest.raises(ValueError, match=r"observe\(\)"):
        rec.inc("dvi_learner_step_seconds")
    with pytest.raises(ValueError, match=">= 0"):
        rec.inc("dvi_actor_requests_served", -1, {"actor": 0})
    with pytest.raises(ValueError, match="number"):
        rec.set("dvi_learner_kl", "0.1")
    assert rec.snapshot() == {}  # nothing invalid was kept


def test_snapshot_holds_latest_gauges_counter_totals_and_histogram_stats():
    rec = MetricsRecorder(backend="memory")
    rec.set("dvi_actor_tau", 2.0, {"actor": 0, "version": 3})
    rec.set("dvi_actor_tau", 2.5, {"actor": 0, "version": 3})  # overwrites
    rec.set("dvi_actor_tau", 1.5, {"version": 4, "actor": 1})  # label order does not matter
    rec.inc("dvi_actor_requests_served", labels={"actor": 0})
    rec.inc("dvi_actor_requests_served", 2, labels={"actor": 0})
    rec.observe("dvi_learner_step_seconds", 0.25)
    rec.observe("dvi_learner_step_seconds", 0.75)
    snap = rec.snapshot()
    assert sorted(snap) == ["dvi_actor_requests_served", "dvi_actor_tau", "dvi_learner_step_seconds"]
    tau = sorted(snap["dvi_actor_tau"], key=lambda e: e["labels"]["actor"])
    assert tau == [
        {"labels": {"actor": "0", "version": "3"}, "value": 2.5},
        {"labels": {"actor": "1", "version": "4"}, "value": 1.5},
    ]
    assert snap["dvi_actor_requests_served"] == [{"labels": {"actor": "0"}, "value": 3.0}]  # 1 + 2
    # value is the last observation; sum = 0.25 + 0.75
    assert snap["dvi_learner_step_seconds"] == [{"labels": {}, "value": 0.75, "count": 2, "sum": 1.0}]
    json.dumps(snap)  # mirrored to Redis as JSON
    snap["dvi_actor_tau"][0]["labels"]["actor"] = "mutated"
    assert rec.snapshot()["dvi_actor_tau"][0]["labels"]["actor"] != "mutated"  # a copy


class _SpyExporter:
    """Stands in for a backend: remembers what the recorder sends it."""

    def __init__(self):
        self.records, self.forgotten = [], []

    def record(self, spec, value, labels):
        self.records.append((spec.name, value, labels))

    def forget(self, spec, labels):
        self.forgotten.append((spec.name, labels))

    def close(self):
        pass


def test_republish_resends_latest_gauges_and_forget_drops_a_series():
    rec = MetricsRecorder(backend="memory")
    rec._exporter = spy = _SpyExporter()
    rec.set("dvi_actor_tau", 2.0, {"actor": 0, "version": 3})
    rec.set("dvi_actor_tau", 2.5, {"actor": 0, "version": 3})
    rec.set("dvi_actor_tau", 1.5, {"actor": 0, "version": 4})
    rec.inc("dvi_actor_requests_served", 2, {"actor": 0})  # cumulative: never re-sent
    spy.records.clear()
    assert rec.republish() == 2
    assert sorted(spy.records) == [
        ("dvi_actor_tau", 1.5, {"actor": "0", "version": "4"}),
        ("dvi_actor_tau", 2.5, {"actor": "0", "version": "3"}),
    ]
    assert rec.forget("dvi_actor_tau", {"actor": 0, "version": 3}) is True
    assert spy.forgotten == [("dvi_actor_tau", {"actor": "0", "version": "3"})]
    assert rec.forget("dvi_actor_tau", {"actor": 0, "version": 3}) is False  # already gone
    assert rec.snapshot()["dvi_actor_tau"] == [{"labels": {"actor": "0", "version": "4"}, "value": 1.5}]
    spy.records.clear()
    assert rec.republish() == 1 and spy.records == [("dvi_actor_tau", 1.5, {"actor": "0", "version": "4"})]
    with pytest.raises(ValueError, match="missing"):
        rec.forget("dvi_actor_tau", {"actor": 0})


def test_auto_backend_without_ray_or_port_is_memory_only():
    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized()
    assert MetricsRecorder().backend == "memory"
    with pytest.raises(ValueError, match="needs a port"):
        MetricsRecorder(backend="prometheus")


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    """Value of the sample `name{labels}` in Prometheus text exposition format."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{labels} in scrape")


def test_prometheus_backend_serves_recorded_values():
    with MetricsRecorder(port=0, addr="127.0.0.1") as rec:
        assert rec.backend == "prometheus" and rec.port > 0
        rec.set("dvi_actor_tau", 2.25, {"actor": "0", "version": "7"})
        rec.set("dvi_learner_kl", 0.125)
        rec.inc("dvi_actor_tokens_generated", 40, {"actor": "1"})
        rec.inc("dvi_actor_tokens_generated", 2, {"actor": "1"})
        rec.observe("dvi_learner_trajectory_age_seconds", 3.0)
        rec.observe("dvi_learner_trajectory_age_seconds", 0.2)
        rec.set("dvi_actor_tau", 1.0, {"actor": "0", "version": "6"})
        assert rec.forget("dvi_actor_tau", {"actor": "0", "version": "6"})  # superseded version
        rec.set("dvi_drift_kl_slope", 0.5)
        assert rec.forget("dvi_drift_kl_slope")
        text = urllib.request.urlopen(f"http://127.0.0.1:{rec.port}/metrics", timeout=5).read().decode()

    direct = lambda n: prometheus_name(get_spec(n), via_ray=False)  # noqa: E731
    assert _sample(text, direct("dvi_actor_tau"), {"actor": "0", "version": "7"}) == 2.25
    assert _sample(text, direct("dvi_learner_kl"), {}) == 0.125
    assert _sample(text, direct("dvi_actor_tokens_generated"), {"actor": "1"}) == 42.0
    age = direct("dvi_learner_trajectory_age_seconds")
    assert _sample(text, age + "_count", {}) == 2.0
    assert _sample(text, age + "_sum", {}) == pytest.approx(3.2)
    assert _sample(text, age + "_bucket", {"le": "0.25"}) == 1.0  # 0.2 <= 0.25 < 3.0
    assert _sample(text, age + "_bucket", {"le": "5.0"}) == 2.0
    assert "# HELP dvi_actor_tau Mean tokens accepted per verifier pass" in text
    with pytest.raises(AssertionError, match="no sample"):
        _sample(text, direct("dvi_actor_tau"), {"actor": "0", "version": "6"})
    # only what this process recorded is exported: no zero-valued learner gauges from an actor
    assert "dvi_learner_ce" not in text and "dvi_drift_kl_slope" not in text
