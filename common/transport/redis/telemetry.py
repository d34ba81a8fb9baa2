"""What the service publishes in Redis for `dvi monitor` and `dvi report`: latest snapshots, a
capped history, and an event log. JSON only (never pickle), so any process can read it.

Keys (all under the namespace `ns`):
  {ns}:telemetry:actor:{actor_id}  string  latest actor snapshot, JSON (expires after actor_ttl_s)
  {ns}:telemetry:actors            set     ids of actors that published
  {ns}:telemetry:learner           string  latest learner snapshot, JSON
  {ns}:telemetry:history           stream  one entry per publish: source, t, data (JSON); MAXLEN ~
  {ns}:events                      stream  one entry per event: kind, t, data (JSON); MAXLEN ~

A snapshot is a flat dict: str keys, values that are numbers, strings, booleans, None or lists of
numbers. Non-finite floats are stored as None (a NaN loss must not stop the service from
reporting it). `t` (publish wall time, seconds since the epoch) and `source` are added on read
and are reserved. The views read these keys; publish any others freely.

Actor snapshot (`publish_actor`), one per generation actor:
  tokens_per_s            tokens generated per second over the last reporting window
  tau                     tokens committed per verifier pass under the current weight version
  acceptance              accepted / drafted under the current weight version
  acceptance_by_position  [p_0, p_1, ...]: acceptance of draft position i given 0..i-1 accepted
  gamma                   draft length of the latest block (0 under AR fallback)
  version                 weight version of the drafter's LoRA adapter
  version_lag             learner's published version - version
  requests, tokens        requests served and tokens generated since the actor started
  ar_fallback             1 while drafting is disabled (plain AR through the verifier), else 0
  rollbacks               drift-guard rollbacks this actor performed
  blocked_versions        weight versions it rolled back (never taken again)
  acceptance_ema          the drift guard's acceptance EMA under the current version
Learner snapshot (`publish_learner`):
  step, phase             optimizer steps taken; schedule phase name (kl, mixed, rl, ...)
  kl, ce, pg, entropy     loss terms of the latest step
  grad_norm               LoRA gradient norm before clipping
  version                 latest published weight version
  stream_length, pending  trajectory stream XLEN; entries delivered but not acked
  dead_lettered, dropped, stale_dropped   trajectories dead-lettered, trimmed unread, too stale
  trajectories_per_s      trajectories consumed per second
  rollbacks_seen          actors' `rollback` events the learner has read from the event stream

Events (`event`): `EVENT_KINDS` lists the kinds the service emits; their fields are free-form.
The event stream is also a channel: the learner reads actors' `rollback` events with
`events_after` (see learner/service.py).

Writes are retried on connection errors by the client itself (redis-py's Retry with exponential
backoff, see `common.transport.redis.client.connect`), then raise ServiceError; a retried XADD can add a
history row or an event twice, which the views tolerate. `RunMetricsWriter` appends the history
to `RUN_DIR/metrics.jsonl` (and events to `RUN_DIR/events.jsonl`) without duplicates, for
`dvi report`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from common.transport.redis.client import check_bytes_client, redis_call
from common.core.config import require

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENT_KINDS = (
    "weights_published",  # learner: version, step
    "rollback",  # actor: actor, bad_version, good_version, before, after, drafted, serving_version
    "ar_fallback",  # actor: actor, tau_ema, break_even, blocks, version
    "ar_release",  # actor: actor, tau_probe, break_even, blocks, version
    "learner_restart",  # learner: resumed_step, version
    "dead_letter",  # learner: entry id, reason
)
"""Event kinds the service emits; `event` accepts any lowercase name, these are the ones the views style."""

RESERVED_KEYS = ("t", "source")
"""Keys a snapshot may not carry: `read` adds them."""

_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Event:
    """One entry of the event stream."""

    id: str
    """Redis stream entry id ("ms-seq"), increasing."""
    kind: str
    """One of EVENT_KINDS (or another lowercase name)."""
    t: float
    """Wall time of the event, seconds since the epoch."""
    fields: dict[str, Any]
    """Free-form JSON fields."""


@dataclass(frozen=True)
class HistoryRow:
    """One entry of the history stream: a snapshot as it was published."""

    id: str
    """Redis stream entry id, increasing."""
    t: float
    """Publish wall time, seconds since the epoch."""
    source: str
    """"learner" or "actor:<id>"."""
    snapshot: dict[str, Any]
    """The published snapshot (without t/source)."""

    @property
    def actor(self) -> str | None:
        """The actor id for an actor row, else None."""
        return self.source[len("actor:") :] if self.source.startswith("actor:") else None


@dataclass
class TelemetryState:
    """Everything the views show, as read at `read_at`."""

    actors: dict[str, dict[str, Any]] = field(default_factory=dict)
    """actor id -> latest snapshot, with `t` (publish time) added; sorted by id."""
    learner: dict[str, Any] = field(default_factory=dict)
    """Latest learner snapshot with `t` added; empty if the learner never published."""
    events: list[Event] = field(default_factory=list)
    """Recent events, oldest first."""
    history: list[HistoryRow] = field(default_factory=list)
    """Recent history rows, oldest first."""
    namespace: str = "dvi"
    """The namespace these were read from."""
    read_at: float = 0.0
    """Wall time of the read."""




def _clean_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_clean_value(key, v) for v in value]
    # numpy / torch scalars: anything with a float value
    if hasattr(value, "item"):
        return _clean_value(key, value.item())
    raise ValueError(f"snapshot key {key!r}: {type(value).__name__} is not a number, string or list")


def clean_snapshot(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """`snapshot` checked and made JSON-safe: str keys, scalars or lists, non-finite floats -> None."""
    require(isinstance(snapshot, Mapping), f"snapshot must be a dict, got {type(snapshot).__name__}")
    out: dict[str, Any] = {}
    for key, value in snapshot.items():
        require(isinstance(key, str) and key != "", f"snapshot keys must be non-empty strings, got {key!r}")
        require(key not in RESERVED_KEYS, f"snapshot key {key!r} is reserved (added on read)")
        out[key] = _clean_value(key, value)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _loads(raw: bytes | str | None, what: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("telemetry: ignoring undecodable %s: %s", what, err)
        return None
    return value if isinstance(value, dict) else None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class Telemetry:
    """Publish and read the service's telemetry under `namespace` in Redis.

    `client` must return bytes (decode_responses=False), as `common.transport.redis.client.connect` gives.
    `history_maxlen` / `events_maxlen` bound the two streams approximately (XADD MAXLEN ~, so up
    to ~100 more entries stay). An actor's latest snapshot expires `actor_ttl_s` after its last
    publish, so a dead actor leaves the view (0 = never expires).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "dvi",
        history_maxlen: int = 10_000,
        events_maxlen: int = 1_000,
        actor_ttl_s: float = 300.0,
    ) -> None:
        check_bytes_client(client, namespace)
        require(history_maxlen >= 1, f"history_maxlen must be >= 1, got {history_maxlen}")
        require(events_maxlen >= 1, f"events_maxlen must be >= 1, got {events_maxlen}")
        require(actor_ttl_s >= 0, f"actor_ttl_s must be >= 0, got {actor_ttl_s}")
        self.client = client
        self.namespace = namespace
        self.history_maxlen = history_maxlen
        self.events_maxlen = events_maxlen
        self.actor_ttl_s = actor_ttl_s
        self.actors_key = f"{namespace}:telemetry:actors"
        self.learner_key = f"{namespace}:telemetry:learner"
        self.history_key = f"{namespace}:telemetry:history"
        self.events_key = f"{namespace}:events"

    def actor_key(self, actor_id: str) -> str:
        return f"{self.namespace}:telemetry:actor:{actor_id}"

    # ---- publishing -------------------------------------------------------------------------

    def publish_actor(self, actor_id: str, snapshot: Mapping[str, Any], t: float | None = None) -> None:
        """Store `snapshot` as actor `actor_id`'s latest and append it to the history."""
        require(
            isinstance(actor_id, str) and bool(_ID_RE.match(actor_id)),
            f"actor_id must be letters, digits, '_', '-' or '.', got {actor_id!r}",
        )
        self._publish(f"actor:{actor_id}", self.actor_key(actor_id), clean_snapshot(snapshot), t, actor_id)

    def publish_learner(self, snapshot: Mapping[str, Any], t: float | None = None) -> None:
        """Store `snapshot` as the learner's latest and append it to the history."""
        self._publish("learner", self.learner_key, clean_snapshot(snapshot), t, None)

    def _publish(self, source: str, key: str, snapshot: dict, t: float | None, actor_id: str | None) -> None:
        now = time.time() if t is None else float(t)
        data = _dumps(snapshot)
        latest = _dumps({"t": now, "data": snapshot})

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            ttl_ms = int(self.actor_ttl_s * 1000) if actor_id is not None and self.actor_ttl_s > 0 else None
            pipe.set(key, latest, px=ttl_ms)
            if actor_id is not None:
                pipe.sadd(self.actors_key, actor_id)
            pipe.xadd(
                self.history_key,
                {"source": source, "t": repr(now), "data": data},
                maxlen=self.history_maxlen,
                approximate=True,
            )
            pipe.execute()

        self._retry(write, f"publish {source} telemetry")

    def event(self, kind: str, t: float | None = None, **fields: Any) -> str:
        """Append an event of `kind` (see EVENT_KINDS) with JSON `fields`; return its entry id."""
        require(isinstance(kind, str) and bool(_KIND_RE.match(kind)), f"event kind must be a lowercase name, got {kind!r}")
        now = time.time() if t is None else float(t)
        data = _dumps(clean_snapshot(fields))
        entry = self._retry(
            lambda: self.client.xadd(
                self.events_key,
                {"kind": kind, "t": repr(now), "data": data},
                maxlen=self.events_maxlen,
                approximate=True,
            ),
            f"publish {kind} event",
        )
        log.info("telemetry %s: event %s %s", self.namespace, kind, data)
        return _text(entry)

    def remove_actor(self, actor_id: str) -> None:
        """Forget an actor that shut down cleanly (its history rows stay)."""
        self._retry(
            lambda: self.client.pipeline(transaction=True)
            .delete(self.actor_key(actor_id))
            .srem(self.actors_key, actor_id)
            .execute(),
            "remove actor telemetry",
        )

    # ---- reading ----------------------------------------------------------------------------

    def read(self, history: int = 500, events: int = 50) -> TelemetryState:
        """The latest snapshots, the last `events` events and the last `history` history rows.

        Undecodable entries are skipped with a warning. Actors whose snapshot expired are
        dropped from the actor set. ServiceError if Redis stays unreachable.
        """
        require(history >= 0 and events >= 0, f"history and events must be >= 0, got {history}, {events}")

        def fetch_ids() -> list[bytes]:
            return sorted(self.client.smembers(self.actors_key))

        def fetch(ids: list[bytes]) -> list:
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self.learner_key)
            for actor_id in ids:
                pipe.get(self.actor_key(_text(actor_id)))
            if events:
                pipe.xrevrange(self.events_key, count=events)
            if history:
                pipe.xrevrange(self.history_key, count=history)
            return pipe.execute()

        ids = self._retry(fetch_ids, "read telemetry actors")
        replies = self._retry(lambda: fetch(ids), "read telemetry")
        read_at = time.time()
        learner_raw, actor_raws = replies[0], replies[1 : 1 + len(ids)]
        rest = replies[1 + len(ids) :]
        event_entries = rest.pop(0) if events else []
        history_entries = rest.pop(0) if history else []

        state = TelemetryState(namespace=self.namespace, read_at=read_at)
        latest = _loads(learner_raw, "learner snapshot")
        if latest is not None:
            state.learner = {**(latest.get("data") or {}), "t": latest.get("t")}
        expired = []
        for raw_id, raw in zip(ids, actor_raws):
            actor_id = _text(raw_id)
            latest = _loads(raw, f"actor {actor_id} snapshot")
            if latest is None:
                expired.append(actor_id)
                continue
            state.actors[actor_id] = {**(latest.get("data") or {}), "t": latest.get("t")}
        if expired:  # best effort: a concurrent publish re-adds the id
            self._retry(lambda: self.client.srem(self.actors_key, *expired), "prune telemetry actors")
        for entry_id, f in reversed(event_entries):
            data = _loads(f.get(b"data"), f"event {_text(entry_id)}")
            if data is None or b"kind" not in f:
                continue
            state.events.append(Event(_text(entry_id), _text(f[b"kind"]), _float(f.get(b"t")), data))
        for entry_id, f in reversed(history_entries):
            data = _loads(f.get(b"data"), f"history row {_text(entry_id)}")
            if data is None or b"source" not in f:
                continue
            state.history.append(HistoryRow(_text(entry_id), _float(f.get(b"t")), _text(f[b"source"]), data))
        return state

    def events_after(self, after: str = "0", count: int = 100) -> tuple[list[Event], str]:
        """Up to `count` events with stream id > `after` ("0": from the oldest kept), oldest first,
        and the id to pass as `after` next time (the last entry read, decodable or not; `after`
        itself when there was none). For a reader that must not miss an event, like the learner
        counting rollbacks.
        """
        require(count >= 1, f"count must be >= 1, got {count}")
        start = "-" if after in ("", "0", "0-0") else f"({after}"
        entries = self._retry(lambda: self.client.xrange(self.events_key, min=start, count=count), "read events")
        out = []
        for entry_id, f in entries:
            data = _loads(f.get(b"data"), f"event {_text(entry_id)}")
            if data is not None and b"kind" in f:
                out.append(Event(_text(entry_id), _text(f[b"kind"]), _float(f.get(b"t")), data))
        return out, (_text(entries[-1][0]) if entries else after)

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return redis_call(fn, what=f"{what} (namespace {self.namespace})")


def _float(raw: bytes | None) -> float:
    try:
        return float(raw) if raw is not None else 0.0
    except ValueError:
        return 0.0


# ---- run directory ----------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def history_record(row: HistoryRow) -> dict[str, Any]:
    """One metrics.jsonl object: `t`, `source`, `id`, then the snapshot keys."""
    return {"t": row.t, "source": row.source, "id": row.id, **row.snapshot}


def event_record(ev: Event) -> dict[str, Any]:
    """One events.jsonl object: `t`, `kind`, `id`, then the event's fields."""
    return {"t": ev.t, "kind": ev.kind, "id": ev.id, **ev.fields}


def _last_id(path: Path) -> str | None:
    """The `id` of the last complete line of a JSONL file, or None."""
    if not path.exists():
        return None
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 65_536))
        tail = fh.read().splitlines()
    for line in reversed(tail):
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash, or a partial first line of the tail
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            return obj["id"]
    return None


class RunMetricsWriter:
    """Appends telemetry history rows to `RUN_DIR/metrics.jsonl` and events to `RUN_DIR/events.jsonl`.

    Each `write(state)` appends only the rows and events newer than the last one written (by
    stream id, recovered from the files when reopened), so it can be called on every refresh
    with overlapping reads. Rows trimmed from Redis between two calls are lost: call it at
    least once per `history_maxlen` publishes.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.events_path = self.run_dir / EVENTS_FILE
        self._last_row = _last_id(self.metrics_path)
        self._last_event = _last_id(self.events_path)

    def write(self, state: TelemetryState) -> int:
        """Append the new history rows and events of `state`; return how many rows were added."""
        rows = _newer(state.history, self._last_row)
        events = _newer(state.events, self._last_event)
        if rows:
            _append(self.metrics_path, [history_record(r) for r in rows])
            self._last_row = rows[-1].id
        if events:
            _append(self.events_path, [event_record(e) for e in events])
            self._last_event = events[-1].id
        return len(rows)


def _newer(items: list, last_id: str | None) -> list:
    if last_id is None:
        return list(items)
    last = _id_key(last_id)
    return [x for x in items if _id_key(x.id) > last]


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(_dumps(rec) + "\n")


def record_run_metrics(path: str | Path, state: TelemetryState) -> int:
    """Append `state`'s new history rows (and events) to the run directory `path`; return rows added.

    Stateless convenience around `RunMetricsWriter` (re-reads the last written id each call).
    """
    return RunMetricsWriter(path).write(state)
