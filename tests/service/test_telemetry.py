"""Telemetry against a real Redis: round trips, capped history, event order, run-dir JSONL."""

from __future__ import annotations

import json
import math

import pytest

from common.core.errors import ServiceError
from common.transport.redis.client import connect, free_port
from common.transport.redis.telemetry import RunMetricsWriter, Telemetry, record_run_metrics


def test_publish_read_round_trip(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns)
    actor = {"tokens_per_s": 41.5, "tau": 2.75, "acceptance_by_position": [0.9, 0.7], "version": 3, "ar_fallback": 0}
    tel.publish_actor("a1", actor, t=100.0)
    tel.publish_actor("a0", {"tau": 1.0, "kl": math.nan}, t=101.0)
    tel.publish_learner({"step": 12, "phase": "kl", "kl": 0.25, "version": 3}, t=102.0)

    state = tel.read()
    assert state.namespace == redis_ns
    assert list(state.actors) == ["a0", "a1"]  # sorted
    assert state.actors["a1"] == {**actor, "t": 100.0}
    assert state.actors["a0"] == {"tau": 1.0, "kl": None, "t": 101.0}  # NaN is stored as null
    assert state.learner == {"step": 12, "phase": "kl", "kl": 0.25, "version": 3, "t": 102.0}
    assert [(r.source, r.t, r.actor) for r in state.history] == [
        ("actor:a1", 100.0, "a1"),
        ("actor:a0", 101.0, "a0"),
        ("learner", 102.0, None),
    ]
    assert state.history[0].snapshot == actor
    # values are plain JSON in Redis, never pickle
    raw = redis_client.get(f"{redis_ns}:telemetry:actor:a1")
    assert json.loads(raw) == {"t": 100.0, "data": actor}


def test_snapshot_validation(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns)
    with pytest.raises(ValueError, match="reserved"):
        tel.publish_actor("a0", {"t": 1})
    with pytest.raises(ValueError, match="not a number"):
        tel.publish_learner({"x": object()})
    with pytest.raises(ValueError, match="actor_id"):
        tel.publish_actor("bad id", {})


def test_history_is_capped_and_read_limited(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns, history_maxlen=10)
    for i in range(300):
        tel.publish_learner({"step": i})
    length = redis_client.xlen(f"{redis_ns}:telemetry:history")
    assert 10 <= length <= 110  # MAXLEN ~ trims whole nodes of up to 100 entries
    state = tel.read(history=5)
    assert [r.snapshot["step"] for r in state.history] == [295, 296, 297, 298, 299]
    assert state.learner["step"] == 299


def test_events_in_order_and_capped(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns, events_maxlen=1)
    kinds = ["weights_published", "ar_fallback", "rollback", "ar_release"]
    ids = [tel.event(kind, version=i, actor="a0") for i, kind in enumerate(kinds)]
    state = tel.read(events=3)
    assert [e.kind for e in state.events] == kinds[1:]
    assert [e.id for e in state.events] == ids[1:]
    assert state.events[1].fields == {"version": 2, "actor": "a0"}
    assert state.events[0].t <= state.events[-1].t
    for i in range(200):
        tel.event("dead_letter", n=i)
    assert redis_client.xlen(f"{redis_ns}:events") <= 101
    with pytest.raises(ValueError, match="event kind"):
        tel.event("Roll Back")


def test_events_after_reads_on_from_the_last_id(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns)
    assert tel.events_after() == ([], "0")
    ids = [tel.event(kind, n=i) for i, kind in enumerate(["weights_published", "rollback", "ar_fallback"])]
    events, last = tel.events_after("0", count=2)
    assert [e.kind for e in events] == ["weights_published", "rollback"] and last == ids[1]
    redis_client.xadd(f"{redis_ns}:events", {"kind": "rollback", "t": "1", "data": "not json"})
    events, last = tel.events_after(last)
    assert [(e.kind, e.fields) for e in events] == [("ar_fallback", {"n": 2})]  # the broken one skipped ...
    assert last != ids[2]  # ... but read past
    assert tel.events_after(last) == ([], last)


def test_expired_actor_leaves_the_view(redis_client, redis_ns):
    tel = Telemetry(redis_client, namespace=redis_ns, actor_ttl_s=60)
    tel.publish_actor("a0", {"tau": 2.0})
    tel.publish_actor("a1", {"tau": 2.0})
    redis_client.delete(tel.actor_key("a0"))  # as if its TTL ran out
    state = tel.read()
    assert list(state.actors) == ["a1"]
    assert redis_client.smembers(tel.actors_key) == {b"a1"}
    assert 0 < redis_client.pttl(tel.actor_key("a1")) <= 60_000
    tel.remove_actor("a1")
    assert tel.read().actors == {}


def test_run_metrics_jsonl_has_no_duplicates(redis_client, redis_ns, tmp_path):
    tel = Telemetry(redis_client, namespace=redis_ns)
    tel.publish_actor("a0", {"tau": 2.0, "version": 1}, t=10.0)
    tel.event("weights_published", version=1, t=10.5)
    writer = RunMetricsWriter(tmp_path)
    assert writer.write(tel.read()) == 1
    tel.publish_learner({"step": 5, "kl": 0.5}, t=11.0)
    assert writer.write(tel.read()) == 1  # only the new row
    # a fresh writer (a restarted monitor) recovers the last id from the file
    tel.publish_actor("a0", {"tau": 2.5, "version": 2}, t=12.0)
    assert record_run_metrics(tmp_path, tel.read()) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["t"], r["source"]) for r in rows] == [(10.0, "actor:a0"), (11.0, "learner"), (12.0, "actor:a0")]
    assert rows[1]["kl"] == 0.5 and rows[2]["tau"] == 2.5
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["version"]) for e in events] == [("weights_published", 1)]


def test_unreachable_redis_is_a_service_error():
    with pytest.raises(ServiceError, match="cannot reach Redis"):
        connect(f"redis://127.0.0.1:{free_port()}/0", retries=1, timeout_s=0.5)


def test_lost_connection_is_a_bounded_service_error(redis_ns):
    # a client whose server went away after it connected: nothing listens on this port
    client = connect(f"redis://127.0.0.1:{free_port()}/0", retries=2, backoff_s=0.0, timeout_s=0.5, ping=False)
    tel = Telemetry(client, namespace=redis_ns)
    with pytest.raises(ServiceError, match="read telemetry actors .* failed: Redis unreachable"):
        tel.read()
    with pytest.raises(ServiceError, match="publish learner telemetry"):
        tel.publish_learner({"step": 1})
    client.close()
