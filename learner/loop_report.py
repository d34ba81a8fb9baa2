"""What the learner loop tells the outside: catalogue metrics, the telemetry snapshot and events,
rollback and dead-letter notices, and `status()`. A mixin of `learner.loop.LearnerLoop`, kept apart
so that the loop module holds only the learning logic; it reads the loop's state and adds no math.

Needs on the loop: learner, stream (a `TrajectorySource`), metrics (a `Metrics` or None),
telemetry (a `Telemetry` or None), clock, consumer, counters, last_stats, _unacked, and the
bookkeeping fields `init_reporting()` sets.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

from common.observe.drift import kl_slope
from common.core.errors import ServiceError

log = logging.getLogger("learner.loop")


def seen_count(learner: Any) -> int:
    """Distinct request ids the learner has taken in (applied or dropped as stale); survives restarts."""
    if hasattr(learner, "seen_count"):
        return int(learner.seen_count())
    return len(learner._seen)  # TODO(learner): expose seen_count(); the set is checkpointed


class LoopReporting:
    """Metrics, telemetry and status of a `LearnerLoop` (mixin; see the module docstring)."""

    def init_reporting(self) -> None:
        """Set the reporting bookkeeping; called once from the loop's `__init__`."""
        self._dead_seen = 0
        self._rate_window: list[tuple[float, int]] = []
        # Actors tell the learner about rollbacks through the telemetry event stream. It is read
        # from its start: `rollbacks_seen` counts the namespace's rollbacks, across restarts.
        self._events_after = "0"
        self._last_events_read = -1e9
        self._last_report = -1e9
        self.rollbacks: deque[dict[str, Any]] = deque(maxlen=64)
        self._kl_window: deque[tuple[float, float]] = deque(maxlen=32)  # (step, kl) for dvi_drift_kl_slope
        self._dropped_seen: int | None = None  # stream drops when first read; earlier ones were counted before
        if self.metrics is not None:  # rare events: their series exist (at 0) from the start
            for name in ("dvi_learner_skipped_steps", "dvi_learner_trajectories_dropped",
                         "dvi_learner_trajectories_stale", "dvi_learner_trajectories_dead_lettered"):
                self.metrics.inc(name, 0)

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
        if not force and now - self._last_report < 1.0:
            return
        self._last_report = now
        key = self.stream.name
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


    def _record_ingest(self, trajs: list, before: dict[str, int], after: dict[str, int]) -> None:
        """Arrival rate, trajectory ages and stale drops of one ingested batch."""
        self._rate_window.append((self.clock(), len(trajs)))
        if self.metrics is None:
            return
        now = time.time()
        for t in trajs:
            self.metrics.observe("dvi_learner_trajectory_age_seconds", max(1e-6, now - t.created_at))
        stale = after["stale_dropped"] - before["stale_dropped"]
        if stale > 0:
            self.metrics.inc("dvi_learner_trajectories_stale", stale)


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
