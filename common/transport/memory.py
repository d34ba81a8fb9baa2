"""In-process transport: a trajectory stream and a weight store that live in one Python process.

The protocols of `common.transport.protocols` (TrajectorySink and TrajectorySource; WeightPublisher and
WeightSource), as the Redis implementations (`common.transport.redis.streams.TrajectoryStream`,
`common.transport.redis.weights.WeightStore`) keep them, minus the network: at-least-once delivery with
per-consumer pending entries, ack, claim of idle entries and a dead-letter list; the same wire
codec; weight versions that strictly increase, a publish log and blocked (rolled-back) versions.
`dvi train-local` runs the service's `learner.loop.LearnerLoop` over these, and tests use them to
exercise the loop's and the generator's ack, dedupe, staleness, rollback and publish logic
without Redis or Ray.

Not thread-safe: one thread drives both ends (that is how train-local uses them). Nothing is
trimmed: the stream holds what is published until it is acked (`dropped` is always 0).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.core.codec import decode_trajectory, encode_trajectory
from common.core.errors import VersionConflictError, WeightNotFoundError
from common.transport.protocols import Entry, Origin, StreamStats
from common.core.types import Trajectory


@dataclass
class _Pending:
    consumer: str
    trajectory: Trajectory
    delivered_at: float


class MemoryTrajectoryStream:
    """A single consumer group over an in-memory queue. Entry ids are "1", "2", ... (increasing)."""

    def __init__(self, name: str = "trajectories", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._unread: deque[Entry] = deque()
        self._pending: dict[str, _Pending] = {}
        self.dead_letters: list[tuple[str, str, str]] = []
        """(entry id, consumer, reason) of every dead-lettered entry, oldest first."""
        self._seq = 0
        self._published = self._consumed = 0

    def encode(self, traj: Trajectory) -> bytes:
        """The wire bytes of `traj` (the Redis stream's codec); CodecError if it is invalid."""
        return encode_trajectory(traj)

    def publish_raw(self, data: bytes, origin: Origin | None = None) -> str:
        """Decode `data` (CodecError if it is not a valid record) and append it; `origin` is not kept."""
        return self.publish(decode_trajectory(data))

    def publish(self, traj: Trajectory, origin: Origin | None = None) -> str:
        """Append one trajectory (validated, as the Redis stream does); return its entry id."""
        traj.validate()
        self._seq += 1
        entry_id = str(self._seq)
        self._unread.append((entry_id, traj))
        self._published += 1
        return entry_id

    def ensure_group(self) -> None:
        """Nothing to create: the group exists with the stream."""

    def consume(self, consumer: str, count: int, block_ms: int = 0) -> list[Entry]:
        """Up to `count` unread entries, now pending for `consumer`. Never blocks (`block_ms` is ignored)."""
        out: list[Entry] = []
        while self._unread and len(out) < count:
            entry_id, traj = self._unread.popleft()
            self._pending[entry_id] = _Pending(consumer, traj, self.clock())
            out.append((entry_id, traj))
        self._consumed += len(out)
        return out

    def pending_own(self, consumer: str, count: int, after: str = "0") -> list[Entry]:
        """`consumer`'s delivered-but-unacked entries with ids above `after`, oldest first."""
        mine = sorted((int(i), p.trajectory) for i, p in self._pending.items()
                      if p.consumer == consumer and int(i) > int(after))
        return [(str(i), t) for i, t in mine[:count]]

    def claim_stale(self, consumer: str, min_idle_ms: int) -> list[Entry]:
        """Entries pending for any consumer for at least `min_idle_ms`, now `consumer`'s."""
        now, out = self.clock(), []
        for entry_id in sorted(self._pending, key=int):
            p = self._pending[entry_id]
            if (now - p.delivered_at) * 1000.0 >= min_idle_ms:
                self._pending[entry_id] = _Pending(consumer, p.trajectory, now)
                out.append((entry_id, p.trajectory))
        self._consumed += len(out)
        return out

    def ack(self, entry_ids: Sequence[str]) -> int:
        """Forget acked entries; return how many were pending."""
        return sum(self._pending.pop(i, None) is not None for i in entry_ids)

    def dead_letter(self, consumer: str, entry_id: str, reason: str, payload: bytes = b"") -> None:
        """Move a pending entry to the dead letters (acked here), with its reason."""
        self._pending.pop(entry_id, None)
        self.dead_letters.append((entry_id, consumer, reason))

    def clear(self) -> None:
        """Drop every unread entry (pending ones stay until acked, as XTRIM leaves the PEL)."""
        self._unread.clear()

    def lag(self) -> int:
        """Entries not delivered yet."""
        return len(self._unread)

    def length(self) -> int:
        """Entries not acked yet (unread or pending)."""
        return len(self._unread) + len(self._pending)

    def pending_count(self) -> int:
        return len(self._pending)

    def dead_letter_count(self) -> int:
        return len(self.dead_letters)

    def dropped_count(self) -> int:
        return 0

    def stats(self) -> StreamStats:
        return StreamStats(published=self._published, rejected=0, consumed=self._consumed,
                           dead_lettered=len(self.dead_letters), trimmed_pending=0, dropped=0)


@dataclass(frozen=True)
class MemoryWeightRecord:
    """One stored weight version: CPU copies of the tensors, who published it, its metadata."""

    version: int
    tensors: dict[str, torch.Tensor]
    learner_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    """Unix seconds of the publish."""


class MemoryWeightStore:
    """Weight versions in memory; versions strictly increase. Keeps the last `keep` records
    (older versions stay in `publish_log`, their tensors are let go)."""

    def __init__(self, keep: int = 1, clock: Callable[[], float] = time.time) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self.clock = clock
        self._records: deque[MemoryWeightRecord] = deque(maxlen=keep)
        self._log: list[dict] = []
        self._blocked: dict[int, dict] = {}

    def publish(self, tensors: dict[str, torch.Tensor], version: int, learner_id: str,
                metadata: dict[str, str] | None = None) -> MemoryWeightRecord:
        """Store CPU copies of `tensors` as `version`; VersionConflictError (a ValueError) unless
        it exceeds the latest."""
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise VersionConflictError(version, latest)
        record = MemoryWeightRecord(version, {k: v.detach().to("cpu").clone() for k, v in tensors.items()},
                                    learner_id, dict(metadata or {}), self.clock())
        self._records.append(record)
        self._log.append({"version": version, "step": int(record.metadata.get("step", -1)), "t": record.created_at,
                          "learner_id": learner_id})
        return record

    def latest_version(self) -> int | None:
        return self._log[-1]["version"] if self._log else None

    def versions(self) -> list[int]:
        """Versions whose tensors are still kept, ascending."""
        return [r.version for r in self._records]

    def publish_log(self) -> list[dict]:
        """One entry per published version, oldest first: {version, step, t, learner_id}."""
        return [dict(entry) for entry in self._log]

    def block(self, version: int, actor: str, reason: str) -> None:
        """Record that `version` was rolled back: no one takes it again."""
        self._blocked[int(version)] = {"actor": actor, "reason": reason[:500], "t": self.clock()}

    def blocked_versions(self) -> set[int]:
        return set(self._blocked)

    def fetch(self, version: int | None = None) -> MemoryWeightRecord:
        """The latest record, or `version` if it is still kept; WeightNotFoundError (a
        LookupError) otherwise."""
        for record in reversed(self._records):
            if version is None or record.version == version:
                return record
        raise WeightNotFoundError(f"weight version {version} is not kept (latest {self.latest_version()})")

    def subscribe(self) -> "MemoryWeightNotices":
        return MemoryWeightNotices(self)


class MemoryWeightNotices:
    """`WeightNotices` over a `MemoryWeightStore`: one thread drives the store, so `wait` answers
    at once from `latest_version()` (it never sleeps through `timeout_s`)."""

    def __init__(self, store: MemoryWeightStore) -> None:
        self.store = store

    def wait(self, newer_than: int | None, timeout_s: float) -> int | None:
        latest = self.store.latest_version()
        return latest if latest is not None and (newer_than is None or latest > newer_than) else None

    def close(self) -> None:
        """Nothing to release."""
