"""In-process transport: a trajectory stream and a weight store that live in one Python process.

The same contracts as the Redis implementations (`common.transport.TrajectoryStream`,
`common.weights.WeightStore`), minus the network: at-least-once delivery with per-consumer pending
entries, ack, claim of idle entries and a dead-letter list; weight versions that strictly increase.
`dvi train-local` runs the service's `learner.loop.LearnerLoop` over these, and tests use them to
exercise the loop's ack, dedupe, staleness and publish logic without Redis or Ray.

Not thread-safe: one thread drives both ends (that is how train-local uses them). Nothing is
trimmed: the stream holds what is published until it is acked (`dropped` is always 0).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from common.transport import StreamStats
from common.types import Trajectory

Entry = tuple[str, Trajectory]


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

    def publish(self, traj: Trajectory) -> str:
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


class MemoryWeightStore:
    """Weight versions in memory; versions strictly increase. Keeps the last `keep` records
    (older versions stay listed in `versions`, their tensors are let go)."""

    def __init__(self, keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self.versions: list[int] = []
        self._records: deque[MemoryWeightRecord] = deque(maxlen=keep)

    def publish(self, tensors: dict[str, torch.Tensor], version: int, learner_id: str,
                metadata: dict[str, str] | None = None) -> MemoryWeightRecord:
        """Store CPU copies of `tensors` as `version`; ValueError unless it exceeds the latest."""
        latest = self.latest_version()
        if latest is not None and version <= latest:
            raise ValueError(f"weight version {version} is not above the latest, {latest}")
        record = MemoryWeightRecord(version, {k: v.detach().to("cpu").clone() for k, v in tensors.items()},
                                    learner_id, dict(metadata or {}))
        self._records.append(record)
        self.versions.append(version)
        return record

    def latest_version(self) -> int | None:
        return self.versions[-1] if self.versions else None

    def blocked_versions(self) -> set[int]:
        """No actor rolls back in one process: nothing is blocked."""
        return set()

    def fetch(self, version: int | None = None) -> MemoryWeightRecord:
        """The latest record, or `version` if it is still kept; LookupError otherwise."""
        for record in reversed(self._records):
            if version is None or record.version == version:
                return record
        raise LookupError(f"weight version {version} is not kept (latest {self.latest_version()})")
