"""What actors and the learner need from the outside world, as `typing.Protocol`s.

`actors.generator.Generator` and `learner.loop.LearnerLoop` are typed against these and nothing
else, so any implementation fits: the Redis one (`common.transport.redis.streams.TrajectoryStream`,
`common.transport.redis.weights.WeightStore`, `common.transport.redis.telemetry.Telemetry`, `common.observe.metrics.MetricsRecorder`) for
the service, the in-process one (`common.transport.memory`) for `dvi train-local` and for tests
that check the ack, dedupe, staleness, rollback and publish logic without Redis or Ray.

Vocabulary: an *entry* is one delivered stream message, `(entry id, Trajectory)`; a *weight
version* is an integer that strictly increases with every publish; an *origin* is
`(producer id, producer sequence number)`, the producer's own numbering of what it sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.core.types import Trajectory

Entry = tuple[str, Trajectory]
"""(entry id, trajectory): one delivered message; the id is what `ack` and `dead_letter` take."""
Origin = tuple[str, int]
"""(producer id, producer sequence number >= 1)."""


@dataclass(frozen=True)
class StreamStats:
    """Counters of one trajectory stream instance, plus the stream-wide drop count."""

    published: int
    """Entries this instance added."""
    rejected: int
    """Trajectories this instance refused at publish (too large or invalid); nothing was sent."""
    consumed: int
    """Trajectories this instance returned from consume, claim_stale and pending_own."""
    dead_lettered: int
    """Entries this instance moved to the dead-letter stream."""
    trimmed_pending: int
    """Delivered-but-unacked entries this instance found trimmed away (drop-oldest only)."""
    dropped: int | None
    """Stream-wide entries trimmed before the group read them; None if Redis lost count."""


class TrajectorySink(Protocol):
    """Where a generator sends trajectories. `encode` validates and serialises (CodecError when
    the record is invalid or too large: nothing is sent); `publish_raw` sends encoded bytes and
    may be retried with the same (data, origin) after a ServiceError (consumers dedupe)."""

    def encode(self, traj: Trajectory) -> bytes: ...
    def publish_raw(self, data: bytes, origin: Origin | None = None) -> str: ...
    def publish(self, traj: Trajectory, origin: Origin | None = None) -> str: ...


class TrajectorySource(Protocol):
    """Where the learner loop reads trajectories. Delivery is at least once: an entry stays
    pending for its consumer until acked; `claim_stale` takes over entries a dead consumer held."""

    name: str
    """Label of the stream in metrics."""

    def ensure_group(self) -> None: ...
    def consume(self, consumer: str, count: int, block_ms: int) -> list[Entry]: ...
    def pending_own(self, consumer: str, count: int, after: str) -> list[Entry]: ...
    def claim_stale(self, consumer: str, min_idle_ms: int) -> list[Entry]: ...
    def ack(self, entry_ids: Sequence[str]) -> int: ...
    def dead_letter(self, consumer: str, entry_id: str, reason: str) -> None: ...
    def lag(self) -> int | None: ...
    def length(self) -> int: ...
    def pending_count(self) -> int: ...
    def dead_letter_count(self) -> int: ...
    def dropped_count(self) -> int | None: ...
    def stats(self) -> StreamStats: ...


class WeightRecordLike(Protocol):
    """One stored weight version: its number, who published it and when, its tensors and metadata."""

    version: int
    learner_id: str
    tensors: dict
    metadata: dict
    created_at: float
    """Unix seconds of the publish."""


class WeightPublisher(Protocol):
    """Where the learner loop ships weight versions. Versions strictly increase: `publish` raises
    ValueError for a version not above the latest. Every publish is logged (`publish_log`)."""

    def publish(self, tensors: dict, version: int, learner_id: str, metadata: dict[str, str]) -> WeightRecordLike: ...
    def latest_version(self) -> int | None: ...
    def fetch(self, version: int | None = None) -> WeightRecordLike: ...
    def blocked_versions(self) -> set[int]: ...
    def versions(self) -> list[int]: ...
    def publish_log(self) -> list[dict]: ...


class WeightNotices(Protocol):
    """A subscription to new weight versions: `wait` returns the latest version above
    `newer_than` (None: any) as soon as there is one, or None after `timeout_s`."""

    def wait(self, newer_than: int | None, timeout_s: float) -> int | None: ...
    def close(self) -> None: ...


class WeightSource(Protocol):
    """Where a generator takes weight versions from, and records rollbacks (`block`): a blocked
    version is never taken again by any actor or learner."""

    def latest_version(self) -> int | None: ...
    def fetch(self, version: int | None = None) -> WeightRecordLike: ...
    def versions(self) -> list[int]: ...
    def blocked_versions(self) -> set[int]: ...
    def block(self, version: int, actor: str, reason: str) -> None: ...
    def subscribe(self) -> WeightNotices: ...


class MetricsSink(Protocol):
    """Named gauges, counters and histograms (`common.observe.metrics.METRICS` names them)."""

    def set(self, name: str, value: float, labels: dict[str, object] | None = None) -> None: ...
    def inc(self, name: str, value: float = 1.0, labels: dict[str, object] | None = None) -> None: ...
    def observe(self, name: str, value: float, labels: dict[str, object] | None = None) -> None: ...
    def republish(self) -> int: ...


class TelemetrySink(Protocol):
    """Live snapshots and events that `dvi monitor` and `dvi report` read."""

    def publish_actor(self, actor_id: str, snapshot: Mapping[str, Any], t: float | None = None) -> None: ...
    def publish_learner(self, snapshot: Mapping[str, Any], t: float | None = None) -> None: ...
    def event(self, kind: str, t: float | None = None, **fields: Any) -> str: ...
