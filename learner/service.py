"""The learner side of the service: a plain loop around `learner.learner.Learner`, and its Ray shell.

`LearnerLoop` moves trajectories from the Redis stream into the `Learner`, trains, and ships
weight versions:

  consume -> learner.add (dedupes request ids, filters stale versions)
          -> train_step while the replay is ready and the replay ratio allows
          -> every `publish_every_steps` steps or `publish_every_s` seconds:
               publish_version() -> checkpoint -> WeightStore.publish(adapter_state, version)
          -> checkpoint every `checkpoint_every_steps` steps / `checkpoint_every_s` seconds
          -> XACK the entries the checkpoint holds

Exactly-once effect over at-least-once delivery: an entry is acked only after a checkpoint that
includes it (the checkpoint holds the replay contents and the seen request ids), so a learner
killed at any point restarts from its checkpoint and re-reads its own unacked entries
(`pending_own`) plus any a dead consumer left behind (`claim_stale`) before new ones. An entry
applied before the kill but after the checkpoint is not in the restored learner, so it is applied
once again; an entry applied and checkpointed but not yet acked is refused by the learner's
request-id dedupe. Nothing is lost, nothing is applied twice.

The checkpoint is written before the weights are published, so a restarted learner's version is
never below the store's latest (versions stay strictly increasing; a kill between the two
leaves a gap, which is fine). Without a checkpoint directory entries are acked as soon as they
are added (a restart then starts from scratch, warm-started from the store's latest weights).

`LearnerService` is the Ray actor (`max_restarts`, default 10): it builds the loop and runs it on a
thread from `__init__`, so a restarted actor resumes by itself; a loop that fails (Redis gone for
longer than the retries) ends the process so Ray restarts it from the checkpoint; `drain` asks the
thread to finish the stream, publish a last version and checkpoint. It adds no math.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from common.config import ModelSpec
from common.drift import kl_slope
from common.errors import ServiceError
from common.transport import TrajectoryStream, TransportConfig
from common.types import Trajectory
from common.weights import WeightStore
from learner.config import LearnerConfig

log = logging.getLogger(__name__)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class LearnerLoopConfig:
    """How the learner loop reads, trains, publishes and checkpoints."""

    learner_id: str = "learner-0"
    """Consumer name in the stream's group and learner id on published weights; keep it across restarts."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (and are resumed from); None: no checkpoints, entries acked on add."""
    publish_every_steps: int = 4
    """Publish a new weight version after this many optimiser steps."""
    publish_every_s: float = 30.0
    """Also publish when this many seconds passed since the last publish and a step was taken."""
    checkpoint_every_steps: int = 16
    """Checkpoint (then ack) after this many steps even without a publish."""
    checkpoint_every_s: float = 30.0
    """Checkpoint (then ack) unacked entries at least this often, steps or not."""
    replay_ratio: float = 1.0
    """Optimiser steps per `batch_tokens` newly added drafted tokens (> 1 reuses the replay more)."""
    max_steps_per_poll: int = 8
    """Most optimiser steps between two reads of the stream (keeps the learner responsive)."""
    read_count: int = 16
    """Entries read per XREADGROUP."""
    block_ms: int = 500
    """XREADGROUP block time; below the Redis client's socket timeout."""
    claim_min_idle_ms: int = 30_000
    """Entries another consumer has left pending this long are taken over."""
    claim_every_s: float = 30.0
    """How often to look for such entries (and once at start)."""

    def __post_init__(self) -> None:
        _check(bool(self.learner_id) and not any(c.isspace() for c in self.learner_id),
               f"learner_id must be a non-empty name without spaces, got {self.learner_id!r}")
        for name in ("publish_every_steps", "checkpoint_every_steps", "max_steps_per_poll", "read_count"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("publish_every_s", "checkpoint_every_s", "replay_ratio", "claim_every_s"):
            _check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _check(self.block_ms >= 0, f"block_ms must be >= 0, got {self.block_ms}")
        _check(self.claim_min_idle_ms >= 0, f"claim_min_idle_ms must be >= 0, got {self.claim_min_idle_ms}")


def publish_log_key(namespace: str) -> str:
    """Redis list of JSON {version, step, t, learner_id}: one per weight version this service published."""
    return f"{namespace}:weights:log"


def seen_count(learner: Any) -> int:
    """Distinct request ids the learner has taken in (applied or dropped as stale); survives restarts."""
    if hasattr(learner, "seen_count"):
        return int(learner.seen_count())
    return len(learner._seen)  # TODO(learner): expose seen_count(); the set is checkpointed


def has_checkpoint(directory: str | Path | None) -> bool:
    """True when `directory` holds something a previous run saved."""
    if directory is None:
        return False
    path = Path(directory)
    return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())


def find_checkpoint(directory: str | Path | None) -> Path | None:
    """The checkpoint to resume from: `directory`, or, if a crash hit the moment between the
    writer moving the old checkpoint aside and renaming the new one in, the newest set-aside one."""
    if directory is None:
        return None
    path = Path(directory)
    if has_checkpoint(path):
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime) if path.parent.is_dir() else []
    return aside[-1] if aside and has_checkpoint(aside[-1]) else None


class LearnerLoop:
    """Stream -> Learner -> WeightStore, with checkpoint-then-ack. Not thread-safe: one thread drives it.

    learner: a `learner.learner.Learner` (its `split` is what gets published). stream, weights:
    the transport and the store, same namespace. metrics: a `MetricsRecorder` or None.
    telemetry: a `common.telemetry.Telemetry` or None.
    """

    def __init__(
        self,
        learner: Any,
        stream: TrajectoryStream,
        weights: WeightStore,
        config: LearnerLoopConfig = LearnerLoopConfig(),
        *,
        metrics: Any = None,
        telemetry: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.learner = learner
        self.split = learner.split
        self.stream = stream
        self.weights = weights
        self.config = config
        self.metrics = metrics
        self.telemetry = telemetry
        self.clock = clock
        self.consumer = config.learner_id
        self._batch_tokens = int(getattr(getattr(learner, "config", None), "batch_tokens", 64))
        self._unacked: list[str] = []
        self._credit = 0.0  # optimiser steps the newly added tokens pay for
        now = clock()
        self._last_publish = self._last_checkpoint = self._last_claim = now
        self._steps_since_publish = 0
        self._steps_since_checkpoint = 0
        self._dead_seen = 0
        self._rate_window: list[tuple[float, int]] = []
        self.last_stats: dict[str, Any] | None = None
        self.started = False
        self.counters: dict[str, int] = {
            "read": 0,  # entries read (this process), replays included
            "replayed": 0,  # own pending entries re-read at start
            "claimed": 0,  # other consumers' stale entries taken over
            "acked": 0,
            "published": 0,
            "checkpoints": 0,
            "publish_conflicts": 0,
            "refused": 0,  # decodable but unusable by this learner (dead-lettered)
            "rollbacks_seen": 0,  # actors' drift-guard rollbacks read from the event stream
        }
        # Actors tell the learner about rollbacks through the telemetry event stream. It is read
        # from its start: `rollbacks_seen` counts the namespace's rollbacks, across restarts.
        self._events_after = "0"
        self._last_events_read = -1e9
        self.rollbacks: deque[dict[str, Any]] = deque(maxlen=64)
        self._kl_window: deque[tuple[float, float]] = deque(maxlen=32)  # (step, kl) for dvi_drift_kl_slope
        self._dropped_seen: int | None = None  # stream drops when first read; earlier ones were counted before
        if metrics is not None:  # rare events: their series exist (at 0) from the start
            for name in ("dvi_learner_skipped_steps", "dvi_learner_trajectories_dropped",
                         "dvi_learner_trajectories_stale", "dvi_learner_trajectories_dead_lettered"):
                metrics.inc(name, 0)

    # ---------------------------------------------------------------------------------- start

    def start(self) -> dict[str, Any]:
        """Resume: checkpoint, own unacked entries, stale entries of others. Returns what was done."""
        cfg = self.config
        self.stream.ensure_group()
        resumed = False
        found = find_checkpoint(cfg.checkpoint_dir)
        if found is not None:
            self.learner.load_checkpoint(found)
            resumed = True
            log.info("learner %s: resumed from %s at step %d, version %d",
                     self.consumer, found, self.learner.step, self.learner.version)
        self._align_with_store(resumed)
        replayed = 0
        after = "0"
        while True:  # own entries delivered before a crash and never acked
            batch = self.stream.pending_own(self.consumer, count=cfg.read_count, after=after)
            if not batch:
                break
            after = batch[-1][0]
            replayed += len(batch)
            self._ingest(batch)
        self.counters["replayed"] += replayed
        claimed = self._claim()
        self.started = True
        info = {"resumed": resumed, "step": self.learner.step, "version": self.learner.version,
                "replayed": replayed, "claimed": claimed}
        if resumed or replayed or claimed:
            self._event("learner_restart", resumed_step=self.learner.step, version=self.learner.version,
                        replayed=replayed, claimed=claimed)
        log.info("learner %s started: %s", self.consumer, info)
        return info

    def _align_with_store(self, resumed: bool) -> None:
        """Never publish a version the store already has: warm-start or skip ahead of it."""
        latest = self.weights.latest_version()
        if latest is None or latest < self.learner.version:
            return
        if not resumed and latest > self.learner.version:
            record = self.weights.fetch(latest)  # verified; a fresh learner continues from it
            self.split.load_adapter_state(record.tensors, record.version)
            log.warning("learner %s: no checkpoint; warm-started from published weight version %d",
                        self.consumer, latest)
        elif latest > self.learner.version:
            log.warning("learner %s: checkpoint version %d is behind the store's %d; skipping ahead",
                        self.consumer, self.learner.version, latest)
        self._set_version(latest)

    def _set_version(self, version: int) -> None:
        # The Learner owns its version; bumping it through its own API keeps its invariants.
        while self.learner.version < version:
            self.learner.publish_version()

    # ---------------------------------------------------------------------------------- loop

    def poll(self, block_ms: int | None = None) -> int:
        """One iteration: read new entries, train, maybe publish/checkpoint/ack. Returns entries read."""
        if not self.started:
            self.start()
        cfg = self.config
        if self.clock() - self._last_claim >= cfg.claim_every_s:
            self._claim()
        batch = self.stream.consume(self.consumer, count=cfg.read_count,
                                    block_ms=cfg.block_ms if block_ms is None else block_ms)
        if batch:
            self._ingest(batch)
        else:
            self._maintain()
        self._note_dead_letters()
        self._note_rollbacks()
        return len(batch)

    def run(self, stop: threading.Event, drain: threading.Event | None = None,
            drained: Callable[[], bool] | None = None) -> None:
        """Poll until `stop` is set; when `drain` is set and the stream is drained, `finish()` and return."""
        if not self.started:
            self.start()
        while not stop.is_set():
            n = self.poll()
            if drain is not None and drain.is_set() and n == 0 and (drained or self.stream_drained)():
                self.finish()
                return

    def stream_drained(self) -> bool:
        """True when the group has read every entry in the stream (lag 0). When Redis cannot tell
        (lag unknown after trims or deletions) the caller's empty read is taken as the answer."""
        lag = self.group_lag()
        return lag is None or lag == 0

    def group_lag(self) -> int | None:
        """Entries in the stream the group has not read yet (None if Redis cannot tell)."""
        try:
            groups = self.stream.client.xinfo_groups(self.stream.config.stream_key)
        except redis.ResponseError as err:  # no such key: nothing was ever published
            log.debug("xinfo groups: %s", err)
            return 0
        for g in groups:
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            if name == self.stream.config.group:
                return None if g.get("lag") is None else int(g["lag"])
        return 0

    def finish(self) -> dict[str, Any]:
        """Spend the remaining step credit, publish a last version if anything changed, checkpoint, ack."""
        self._train(limit=None)
        if self._steps_since_publish:
            self._publish()
        self._checkpoint()
        self._report()
        return self.status()

    # ---------------------------------------------------------------------------------- internals

    def _claim(self) -> int:
        self._last_claim = self.clock()
        claimed = self.stream.claim_stale(self.consumer, min_idle_ms=self.config.claim_min_idle_ms)
        mine = set(self._unacked)  # XAUTOCLAIM also returns our own entries waiting for a checkpoint
        claimed = [(entry_id, traj) for entry_id, traj in claimed if entry_id not in mine]
        if claimed:
            self.counters["claimed"] += len(claimed)
            self._ingest(claimed)
        return len(claimed)

    def _ingest(self, batch: Sequence[tuple[str, Trajectory]]) -> None:
        ids = [entry_id for entry_id, _ in batch]
        trajs = [traj for _, traj in batch]
        self.counters["read"] += len(batch)
        before = self.learner.counters()
        try:
            self.learner.add(trajs)
        except ValueError:  # one record the learner refuses (other exit layer, model): isolate it
            for entry_id, traj in batch:
                try:
                    self.learner.add([traj])
                except ValueError as err:
                    self._refuse(entry_id, traj, str(err))
        after = self.learner.counters()
        new_tokens = after["tokens_seen"] - before["tokens_seen"]  # of the added ones: dupes and stale pay nothing
        self._credit += self.config.replay_ratio * new_tokens / self._batch_tokens
        self._unacked.extend(ids)
        self._rate_window.append((self.clock(), len(batch)))
        if self.metrics is not None:
            now = time.time()
            for t in trajs:
                self.metrics.observe("dvi_learner_trajectory_age_seconds", max(1e-6, now - t.created_at))
            stale = after["stale_dropped"] - before["stale_dropped"]
            if stale > 0:
                self.metrics.inc("dvi_learner_trajectories_stale", stale)
        if self.config.checkpoint_dir is None:  # nothing durable to wait for
            self._ack()
        self._train(limit=self.config.max_steps_per_poll)
        self._maintain()

    def _refuse(self, entry_id: str, traj: Trajectory, reason: str) -> None:
        """A decodable trajectory the learner cannot use: dead-letter it (acked there) and go on."""
        self.counters["refused"] += 1
        log.error("learner %s: refused request %s (entry %s, v%d): %s",
                  self.consumer, traj.request_id, entry_id, traj.weight_version, reason)
        self.stream.dead_letter(self.consumer, entry_id, f"learner refused: {reason}")

    def _train(self, limit: int | None) -> int:
        steps = 0
        while self._credit >= 1.0 and (limit is None or steps < limit) and self.learner.ready():
            stats = self.learner.train_step()
            if stats is None:
                break
            self._credit -= 1.0
            steps += 1
            self._steps_since_publish += 1
            self._steps_since_checkpoint += 1
            self.last_stats = dict(stats)
            self._record_step(stats)
            if self._steps_since_publish >= self.config.publish_every_steps:
                self._publish()
        return steps

    def _maintain(self) -> None:
        """Time-based publish and checkpoint, then ack what the checkpoint holds."""
        cfg, now = self.config, self.clock()
        if self._steps_since_publish and now - self._last_publish >= cfg.publish_every_s:
            self._publish()
        if self._steps_since_checkpoint >= cfg.checkpoint_every_steps or (
            self._unacked and now - self._last_checkpoint >= cfg.checkpoint_every_s
        ):
            self._checkpoint()
        self._report()

    def _publish(self) -> int:
        """publish_version -> checkpoint -> WeightStore.publish (that order: see module docstring)."""
        version = self.learner.publish_version()
        self._checkpoint()
        metadata = {"step": str(self.learner.step), "model": str(self.split.model_id),
                    "exit_layer": str(self.split.exit_layer)}
        try:
            self.weights.publish(self.split.adapter_state(), version, self.consumer, metadata)
        except ValueError as err:  # another learner on this namespace is ahead: skip past it
            self.counters["publish_conflicts"] += 1
            log.error("learner %s: weight version %d refused by the store (%s)", self.consumer, version, err)
            latest = self.weights.latest_version() or 0
            self._set_version(latest + 1)
            version = self.learner.version
            self._checkpoint()
            self.weights.publish(self.split.adapter_state(), version, self.consumer, metadata)
        self._steps_since_publish = 0
        self._last_publish = self.clock()
        self.counters["published"] += 1
        entry = {"version": version, "step": self.learner.step, "t": time.time(), "learner_id": self.consumer}
        self.stream.client.rpush(publish_log_key(self.weights.namespace), json.dumps(entry))
        log.info("learner %s: published weight version %d at step %d", self.consumer, version, self.learner.step)
        if self.metrics is not None:
            self.metrics.set("dvi_learner_weight_version", version)
        self._event("weights_published", version=version, step=self.learner.step)
        self._report(force=True)
        return version

    def _checkpoint(self) -> None:
        """Save the learner (if a directory is set), then ack every entry it now holds."""
        if self.config.checkpoint_dir is not None:
            self.learner.save_checkpoint(self.config.checkpoint_dir)
            self.counters["checkpoints"] += 1
        self._last_checkpoint = self.clock()
        self._steps_since_checkpoint = 0
        self._ack()

    def _ack(self) -> None:
        if self._unacked:
            self.stream.ack(self._unacked)
            self.counters["acked"] += len(self._unacked)
            self._unacked = []

    def _note_rollbacks(self, every_s: float = 1.0) -> None:
        """Count and log the rollback events actors published since the last look."""
        if self.telemetry is None or self.clock() - self._last_events_read < every_s:
            return
        self._last_events_read = self.clock()
        try:
            events, self._events_after = self.telemetry.events_after(self._events_after)
        except ServiceError as err:  # the event stream is telemetry: best effort, read again later
            log.debug("learner %s: events not read: %s", self.consumer, err)
            return
        for ev in events:
            if ev.kind != "rollback":
                continue
            f = ev.fields
            self.counters["rollbacks_seen"] += 1
            self.rollbacks.append({"id": ev.id, "t": ev.t, **f})
            log.warning(
                "learner %s: actor %s rolled back weight version %s to %s (acceptance %s -> %s); "
                "%d rollback(s) seen", self.consumer, f.get("actor"), f.get("bad_version"), f.get("good_version"),
                _short(f.get("before")), _short(f.get("after")), self.counters["rollbacks_seen"],
            )

    def _note_dead_letters(self) -> None:
        stats = self.stream.stats()
        if stats.dropped is not None:
            if self.metrics is not None and self._dropped_seen is not None and stats.dropped > self._dropped_seen:
                self.metrics.inc("dvi_learner_trajectories_dropped", stats.dropped - self._dropped_seen)
            self._dropped_seen = max(stats.dropped, self._dropped_seen or 0)
        dead = stats.dead_lettered
        if dead > self._dead_seen:
            n = dead - self._dead_seen
            self._dead_seen = dead
            if self.metrics is not None:
                self.metrics.inc("dvi_learner_trajectories_dead_lettered", n)
            self._event("dead_letter", count=n, total=dead)

    # ---------------------------------------------------------------------------------- reporting

    def status(self) -> dict[str, Any]:
        """JSON-able: step, version, loop counters, learner counters, stream counts, last stats."""
        stats = self.stream.stats()
        return {
            "learner_id": self.consumer,
            "step": self.learner.step,
            "version": self.learner.version,
            "loop": dict(self.counters),
            "learner": dict(self.learner.counters()),
            "seen": seen_count(self.learner),
            "unacked": len(self._unacked),
            "dead_lettered": self.stream.dead_letter_count(),
            "dropped": stats.dropped,
            "rollbacks_seen": self.counters["rollbacks_seen"],
            "rollbacks": list(self.rollbacks),
            "last_stats": _jsonable(self.last_stats),
        }

    def trajectories_per_s(self, window_s: float = 30.0) -> float:
        now = self.clock()
        self._rate_window = [(t, n) for t, n in self._rate_window if now - t <= window_s]
        if not self._rate_window:
            return 0.0
        span = max(now - self._rate_window[0][0], 1.0)
        return sum(n for _, n in self._rate_window) / span

    def _record_step(self, stats: dict[str, Any]) -> None:
        m = self.metrics
        if m is None:
            return
        for key, name in (("kl", "dvi_learner_kl"), ("ce", "dvi_learner_ce"), ("pg", "dvi_learner_pg_loss"),
                          ("entropy", "dvi_learner_entropy"), ("grad_norm", "dvi_learner_grad_norm")):
            value = stats.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                m.set(name, value)
        phase = stats.get("phase")
        if isinstance(phase, str):
            for p in ("kl", "mixed", "rl"):
                m.set("dvi_learner_schedule_phase", 1.0 if p == phase else 0.0, {"phase": p})
        for term in ("kl", "ce", "pg", "entropy"):
            value = stats.get(f"lambda_{term}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                m.set("dvi_learner_schedule_weight", value, {"term": term})
        if stats.get("skipped"):
            m.inc("dvi_learner_skipped_steps", 1)
        kl, step = stats.get("kl"), stats.get("step")
        if isinstance(kl, (int, float)) and isinstance(step, (int, float)) and math.isfinite(kl):
            self._kl_window.append((float(step), float(kl)))
            slope = kl_slope([x for x, _ in self._kl_window], [y for _, y in self._kl_window])
            if slope is not None:
                m.set("dvi_drift_kl_slope", slope)
        seconds = stats.get("step_seconds")
        if isinstance(seconds, (int, float)) and seconds > 0:
            m.observe("dvi_learner_step_seconds", seconds)

    def _report(self, force: bool = False) -> None:
        """Stream gauges and the telemetry snapshot: the single learner telemetry call site."""
        now = self.clock()
        if not force and now - getattr(self, "_last_report", -1e9) < 1.0:
            return
        self._last_report = now
        key = self.stream.config.stream
        length = self.stream.length()
        pending = self.stream.pending_count()
        rate = self.trajectories_per_s()
        if self.metrics is not None:
            self.metrics.set("dvi_stream_length", length, {"stream": key})
            self.metrics.set("dvi_stream_pending", pending, {"stream": key})
            self.metrics.set("dvi_learner_trajectories_per_second", rate)
            self.metrics.set("dvi_learner_weight_version", self.learner.version)
            self.metrics.republish()
        if self.telemetry is None:
            return
        stats = self.last_stats or {}
        counters = self.learner.counters()
        snapshot = {
            "step": self.learner.step,
            "phase": stats.get("phase"),
            "kl": stats.get("kl"),
            "ce": stats.get("ce"),
            "pg": stats.get("pg"),
            "entropy": stats.get("entropy"),
            "grad_norm": stats.get("grad_norm"),
            "reward_mean": stats.get("reward_mean"),
            "version": self.learner.version,
            "stream_length": length,
            "pending": pending,
            "dead_lettered": self.stream.dead_letter_count(),
            "dropped": self.stream.dropped_count(),
            "stale_dropped": counters.get("stale_dropped", 0),
            "duplicates": counters.get("duplicates", 0),
            "added": counters.get("added", 0),
            "trajectories_per_s": rate,
            "rollbacks_seen": self.counters["rollbacks_seen"],
        }
        try:
            self.telemetry.publish_learner(_jsonable(snapshot))
        except (ServiceError, ValueError) as err:  # the monitor is best effort
            log.debug("learner telemetry not published: %s", err)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.telemetry is None:
            return
        try:
            self.telemetry.event(kind, **fields)
        except (ServiceError, ValueError) as err:
            log.debug("learner event %s not published: %s", kind, err)


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ============================================================================================ Ray


@dataclass(frozen=True)
class LearnerSettings:
    """Everything the learner actor needs to build itself; picklable."""

    model: ModelSpec
    """Base model and drafter shape (must match the generators'); device "auto" -> cuda:0 if Ray gave a GPU."""
    redis_url: str
    """Where the stream and the weight store live."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Stream settings; its namespace is also the weight store's and telemetry's."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimiser, schedule, replay and staleness."""
    loop: LearnerLoopConfig = field(default_factory=LearnerLoopConfig)
    """Reading, publishing and checkpointing."""
    secret: bytes | None = None
    """HMAC secret weight records are signed with."""
    torch_threads: int = 1
    """Intra-op CPU threads."""
    metrics: bool = True
    """Record catalogue metrics."""
    telemetry: bool = True
    """Publish snapshots and events for `dvi monitor`."""


class LearnerService:
    """Ray-side shell: builds the Learner and its loop, runs the loop on a thread from `__init__`."""

    def __init__(self, settings: LearnerSettings) -> None:
        from common.runtime import make_observers, start_service_process
        from learner.learner import Learner

        self.settings = settings
        self.started_at = time.time()
        split, client = start_service_process(settings.model, settings.torch_threads, settings.redis_url)
        learner = Learner(split, settings.learner, learner_id=settings.loop.learner_id)
        ns = settings.transport.namespace
        metrics, telemetry = make_observers(client, ns, settings.metrics, settings.telemetry)
        self.loop = LearnerLoop(
            learner, TrajectoryStream(client, settings.transport), WeightStore(client, ns, settings.secret),
            settings.loop, metrics=metrics, telemetry=telemetry,
        )
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._done = threading.Event()
        self._error: str | None = None
        self._start_info: dict[str, Any] | None = None
        # Resume before the actor counts as ready (checkpoint, own unacked entries, stale ones):
        # a checkpoint of another model fails the actor's creation with a clear error.
        self._start_info = self.loop.start()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(self._stop, self._drain)
        except Exception as err:  # noqa: BLE001 - any failure: die so Ray restarts us from the checkpoint
            self._error = f"{type(err).__name__}: {err}"
            log.exception("learner loop failed; exiting so that Ray restarts the learner from its checkpoint")
            logging.shutdown()
            os._exit(1)  # a thread cannot end its actor otherwise; the restart resumes exactly (module doc)
        finally:
            self._done.set()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started_at": self.started_at, "running": not self._done.is_set(),
                "error": self._error, "start": self._start_info, **self.loop.status()}

    def drain(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Ask the loop to read the stream to its end, publish a last version and checkpoint; wait."""
        self._drain.set()
        if not self._done.wait(timeout_s):
            raise ServiceError(f"learner did not drain the stream within {timeout_s:g} s")
        if self._error is not None:
            raise ServiceError(f"learner loop failed: {self._error}")
        return self.status()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def ping(self) -> int:
        return os.getpid()


def learner_placement(num_gpus: float = 0.0, num_cpus: float = 1.0) -> dict[str, Any]:
    """Ray options of the learner actor: pinned to the node advertising `dvi_learner` (cluster.yaml's head)."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if ray.is_initialized() and ray.cluster_resources().get("dvi_learner", 0) >= 1:
        options["resources"] = {"dvi_learner": 1}
    return options


def create_learner_actor(settings: LearnerSettings, *, max_restarts: int = 10, num_cpus: float = 1.0,
                         num_gpus: float = 0.0, name: str | None = None) -> Any:
    """The learner as a restartable Ray actor; method calls are retried across restarts."""
    import ray

    options = dict(learner_placement(num_gpus, num_cpus), max_restarts=max_restarts, max_task_retries=-1)
    if name:
        options["name"] = name
    return ray.remote(LearnerService).options(**options).remote(settings)
