"""The one learning loop of DVI: trajectories in, optimiser steps, weight versions out.

`LearnerLoop` is the same code in both places it runs: the service (`learner/service.py` wraps it
in a Ray actor over a Redis stream and the Redis weight store) and `dvi train-local`
(`learner/local.py` runs it in one process over `common.transport.memory`). It is typed against
the small protocols below, so its ack, dedupe, staleness, step and publish logic runs in-process
with fakes.

  ingest(batch)  learner.add (dedupes request ids, filters stale versions)
                 -> step credit (`step_credit`: per request and/or per new scored token)
                 -> train_step while the replay is ready and the credit allows
                 -> every `publish_every_steps` steps or `publish_every_s` seconds:
                      publish_version() -> checkpoint -> publisher.publish(adapter_state, version)
                 -> checkpoint every `checkpoint_every_steps` steps / `checkpoint_every_s` seconds
                 -> ack the entries the checkpoint holds

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
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.core.types import Trajectory
from common.transport.protocols import Entry, MetricsSink, TelemetrySink, TrajectorySource, WeightPublisher
from learner.accounting import ProducerGaps
from learner.checkpoint import find_checkpoint
from learner.loop_report import LoopReporting, seen_count
from common.core.config import require

log = logging.getLogger(__name__)

__all__ = ["LearnerLoop", "LearnerLoopConfig", "seen_count", "step_credit"]



_PUBLISH_ATTEMPTS = 5
"""Publishes of one version the loop tries while other writers keep getting ahead of it."""


def _accounting_path(checkpoint_dir: str) -> Path:
    """The producers' numbering state (`learner.accounting`), saved beside the checkpoint directory."""
    directory = Path(checkpoint_dir)
    return directory.with_name(directory.name + ".accounting.json")




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
    """Optimiser steps per `batch_tokens` newly added scored tokens (> 1 reuses the replay more)."""
    steps_per_request: float = 0.0
    """Optimiser steps per newly added request, on top of the replay ratio (train-local's K)."""
    max_steps_per_poll: int = 8
    """Most optimiser steps between two reads of the stream (keeps the learner responsive)."""
    stop_at_step: int | None = None
    """Take no optimiser step once the learner's step reaches this (None = never stop)."""
    read_count: int = 16
    """Entries read per XREADGROUP."""
    block_ms: int = 500
    """XREADGROUP block time; below the Redis client's socket timeout."""
    claim_min_idle_ms: int = 30_000
    """Entries another consumer has left pending this long are taken over."""
    claim_every_s: float = 30.0
    """How often to look for such entries (and once at start)."""
    max_version_jump: int = 1_000
    """Refuse to skip ahead of the store by more than this many versions (a runaway version number
    must not make the learner bump its version a billion times)."""

    def __post_init__(self) -> None:
        require(bool(self.learner_id) and not any(c.isspace() for c in self.learner_id),
               f"learner_id must be a non-empty name without spaces, got {self.learner_id!r}")
        for name in ("publish_every_steps", "checkpoint_every_steps", "max_steps_per_poll", "read_count"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("publish_every_s", "checkpoint_every_s", "claim_every_s"):
            require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("replay_ratio", "steps_per_request"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), f"{name} must be >= 0 and finite, got {value}")
        require(self.replay_ratio + self.steps_per_request > 0,
               "replay_ratio and steps_per_request are both 0: the loop would never train")
        require(self.stop_at_step is None or self.stop_at_step >= 0,
               f"stop_at_step must be >= 0 or None, got {self.stop_at_step}")
        require(self.block_ms >= 0, f"block_ms must be >= 0, got {self.block_ms}")
        require(self.claim_min_idle_ms >= 0, f"claim_min_idle_ms must be >= 0, got {self.claim_min_idle_ms}")
        require(self.max_version_jump >= 1, f"max_version_jump must be >= 1, got {self.max_version_jump}")


def step_credit(new_requests: int, new_tokens: int, batch_tokens: int, config: LearnerLoopConfig) -> float:
    """Optimiser steps that newly added data pays for (the loop's one step policy).

    new_requests / new_tokens: requests and scored positions the learner actually added
    (duplicates and stale ones pay nothing); batch_tokens: the learner's batch size in tokens.
    credit = steps_per_request * new_requests + replay_ratio * new_tokens / batch_tokens.
    """
    return config.steps_per_request * new_requests + config.replay_ratio * new_tokens / batch_tokens


class LearnerLoop(LoopReporting):
    """Source -> Learner -> publisher, with checkpoint-then-ack. Not thread-safe: one thread drives it.

    learner: a `learner.learner.Learner` (its `split` is what gets published). stream, weights:
    a `TrajectorySource` and a `WeightPublisher` of one namespace. metrics: a `MetricsRecorder` or
    None; telemetry: a `common.transport.redis.telemetry.Telemetry` or None (see `learner.loop_report`).
    on_step(stats): called after every optimiser step the loop takes, once that step's publish (if
    due) is done; an exception it raises ends the current `poll` (train-local stops on it).
    """

    def __init__(
        self,
        learner: Any,
        stream: TrajectorySource,
        weights: WeightPublisher,
        config: LearnerLoopConfig = LearnerLoopConfig(),
        *,
        metrics: MetricsSink | None = None,
        telemetry: TelemetrySink | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        accounting: ProducerGaps | None = None,
    ) -> None:
        self.learner = learner
        self.accounting = accounting if accounting is not None else ProducerGaps()
        """Holes in the producers' numbering (the stream's `on_origin` feeds it); checkpointed."""
        self.split = learner.split
        self.stream = stream
        self.weights = weights
        self.config = config
        self.metrics = metrics
        self.telemetry = telemetry
        self.clock = clock
        self.on_step = on_step
        self.consumer = config.learner_id
        self._batch_tokens = int(getattr(getattr(learner, "config", None), "batch_tokens", 64))
        self._unacked: list[str] = []
        self._credit = 0.0  # optimiser steps the newly added data pays for (`step_credit`)
        now = clock()
        self._last_publish = self._last_checkpoint = self._last_claim = now
        self._steps_since_publish = 0
        self._steps_since_checkpoint = 0
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
        self.init_reporting()

    # ---------------------------------------------------------------------------------- start

    def start(self) -> dict[str, Any]:
        """Resume: checkpoint, own unacked entries, stale entries of others. Returns what was done."""
        cfg = self.config
        self.stream.ensure_group()
        resumed = False
        found = find_checkpoint(cfg.checkpoint_dir)
        if found is not None:
            self.learner.load_checkpoint(found)
            self._load_accounting(_accounting_path(cfg.checkpoint_dir))
            resumed = True
            log.info("learner %s: resumed from %s at step %d, version %d",
                     self.consumer, found, self.learner.step, self.learner.version)
        self._align_with_store(resumed)
        replayed = self._replay_own_pending()  # delivered before a crash and never acked
        claimed = self._claim()
        self.started = True
        info = {"resumed": resumed, "step": self.learner.step, "version": self.learner.version,
                "replayed": replayed, "claimed": claimed}
        if resumed or replayed or claimed:
            self._event("learner_restart", resumed_step=self.learner.step, version=self.learner.version,
                        replayed=replayed, claimed=claimed)
        log.info("learner %s started: %s", self.consumer, info)
        return info

    def _replay_own_pending(self) -> int:
        """Ingest this consumer's delivered-but-unacked entries the loop does not hold (all of them
        after a crash; after a Redis outage, those whose delivery reply was lost). Returns how many."""
        replayed, after, mine = 0, "0", set(self._unacked)
        while True:
            batch = self.stream.pending_own(self.consumer, count=self.config.read_count, after=after)
            if not batch:
                break
            after = batch[-1][0]
            batch = [(entry_id, traj) for entry_id, traj in batch if entry_id not in mine]
            replayed += len(batch)
            if batch:
                self.ingest(batch)
        self.counters["replayed"] += replayed
        return replayed

    def resync(self) -> int:
        """After Redis was away: pick up own pending entries the loop lost track of (a read whose
        reply never came), so none waits for a claim. Applying one twice is refused by the
        learner's dedupe. Returns how many were re-read."""
        replayed = self._replay_own_pending()
        if replayed:
            log.info("learner %s: re-read %d pending entries after a Redis outage", self.consumer, replayed)
        return replayed

    def _align_with_store(self, resumed: bool) -> None:
        """Never publish a version the store already has, never start from a rolled-back one:
        warm-start from (or skip ahead of) the store's newest version, or, when that version, or
        the checkpoint's, was blocked by an actor's rollback, from the newest good one."""
        latest = self.weights.latest_version()
        blocked = self.weights.blocked_versions()
        if latest is not None and latest > self.learner.version:
            require(latest - self.learner.version <= self.config.max_version_jump,
                   f"the store's weight version {latest} is more than max_version_jump="
                   f"{self.config.max_version_jump} ahead of this learner's {self.learner.version}")
            if not resumed:
                start_from = self._last_good(blocked)
                if start_from is not None:
                    record = self.weights.fetch(start_from)  # verified; a fresh learner continues from it
                    self.split.load_adapter_state(record.tensors, record.version)
                    log.warning("learner %s: no checkpoint; warm-started from published weight version %d%s",
                                self.consumer, start_from, f" (latest {latest} is blocked)" if start_from != latest else "")
            else:
                log.warning("learner %s: checkpoint version %d is behind the store's %d; skipping ahead",
                            self.consumer, self.learner.version, latest)
            self._set_version(latest)
        elif resumed and self.learner.version in blocked:
            good = self._last_good(blocked)
            if good is not None:  # our own weights were rolled back: continue from the good ones
                self.split.load_adapter_state(self.weights.fetch(good).tensors, self.learner.version)
                log.warning("learner %s: checkpoint version %d was rolled back; resuming from version %d's weights",
                            self.consumer, self.learner.version, good)

    def _last_good(self, blocked: set[int]) -> int | None:
        """The newest kept version no rollback blocked."""
        if not blocked:
            return self.weights.latest_version()
        good = [v for v in self.weights.versions() if v not in blocked]
        return max(good) if good else None

    def _set_version(self, version: int) -> None:
        # The Learner owns its version; bumping it through its own API keeps its invariants.
        while self.learner.version < version:
            self.learner.publish_version()

    def _load_accounting(self, path: Path) -> None:
        if path.is_file():
            try:
                self.accounting.load(json.loads(path.read_text()))
            except ValueError as err:  # a corrupt side file: counting restarts, learning does not stop
                log.error("learner %s: %s unreadable (%s); producer accounting restarts", self.consumer, path, err)

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
            self.ingest(batch)
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
        """True when the group has read every entry in the stream (lag 0). When the source cannot
        tell (lag unknown after trims or deletions) the caller's empty read is taken as the answer."""
        lag = self.stream.lag()
        return lag is None or lag == 0

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
            self.ingest(claimed)
        return len(claimed)

    def ingest(self, batch: Sequence[Entry]) -> None:
        """The loop's one way in: hand delivered entries to the learner, then train and maintain.

        The learner dedupes request ids and drops stale versions; a record it refuses (another
        exit layer or model) is dead-lettered alone. The added requests and scored tokens earn
        step credit (`step_credit`); the entries are acked once a checkpoint holds them (at once
        without a checkpoint directory). Then up to `max_steps_per_poll` optimiser steps, and
        the time- and step-based publish / checkpoint (`_maintain`).
        """
        ids = [entry_id for entry_id, _ in batch]
        trajs = [traj for _, traj in batch]
        self.counters["read"] += len(batch)
        before = self.learner.counters()
        try:
            self.learner.add(trajs)
        except Exception:  # noqa: BLE001 - one record the learner cannot take must not stop it: isolate it
            for entry_id, traj in batch:
                try:
                    self.learner.add([traj])
                except Exception as err:  # noqa: BLE001 - dead-lettered with its reason, never lost
                    self._refuse(entry_id, traj, f"{type(err).__name__}: {err}")
        after = self.learner.counters()
        # of the added ones only: duplicates and stale ones pay nothing
        self._credit += step_credit(after["added"] - before["added"], after["tokens_seen"] - before["tokens_seen"],
                                    self._batch_tokens, self.config)
        self._unacked.extend(ids)
        self._record_ingest(trajs, before, after)
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
        """Optimiser steps while credit, the replay and `stop_at_step` allow (at most `limit`).
        A skipped (non-finite) update spends credit but does not count toward a publish."""
        steps, stop_at = 0, self.config.stop_at_step
        while (self._credit >= 1.0 and (limit is None or steps < limit) and self.learner.ready()
               and (stop_at is None or self.learner.step < stop_at)):
            stats = self.learner.train_step()
            if stats is None:
                break
            self._credit -= 1.0
            steps += 1
            self._steps_since_checkpoint += 1
            self.last_stats = dict(stats)
            self._record_step(stats)
            if not stats.get("skipped"):
                self._steps_since_publish += 1
                if self._steps_since_publish >= self.config.publish_every_steps:
                    self._publish()
            if self.on_step is not None:
                self.on_step(stats)
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
        """publish_version -> checkpoint -> publisher.publish (that order: see module docstring)."""
        version = self.learner.publish_version()
        self._checkpoint()
        metadata = {"step": str(self.learner.step), "model": str(self.split.model_id),
                    "exit_layer": str(self.split.exit_layer)}
        for attempt in range(_PUBLISH_ATTEMPTS):
            try:
                self.weights.publish(self.split.adapter_state(), version, self.consumer, metadata)
                break
            except ValueError as err:  # another writer on this namespace is ahead: skip past it
                self.counters["publish_conflicts"] += 1
                log.error("learner %s: weight version %d refused by the store (%s)", self.consumer, version, err)
                newest = getattr(err, "newest", None)  # the store's newest record (its pointer may be forged)
                latest = max(newest if newest is not None else 0, self.weights.latest_version() or 0)
                require(attempt + 1 < _PUBLISH_ATTEMPTS and latest + 1 - self.learner.version <= self.config.max_version_jump,
                       f"weight version {version} refused {attempt + 1} times; the store's newest is {latest} "
                       f"(max_version_jump {self.config.max_version_jump})")
                self._set_version(latest + 1)
                version = self.learner.version
                self._checkpoint()
        self._steps_since_publish = 0
        self._last_publish = self.clock()
        self.counters["published"] += 1
        log.info("learner %s: published weight version %d at step %d", self.consumer, version, self.learner.step)
        if self.metrics is not None:
            self.metrics.set("dvi_learner_weight_version", version)
        self._event("weights_published", version=version, step=self.learner.step)
        self._report(force=True)
        return version

    def _checkpoint(self) -> None:
        """Save the learner (if a directory is set), then ack every entry it now holds."""
        if self.config.checkpoint_dir is not None:
            # Written (atomically) before the learner's checkpoint, never after: counts ahead of
            # the checkpoint only see the replayed entries as duplicates; counts behind it would
            # take every entry acked since for a hole.
            path = _accounting_path(self.config.checkpoint_dir)
            staging = path.with_name(path.name + ".tmp")
            staging.write_text(json.dumps(self.accounting.state()))
            os.replace(staging, path)
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
