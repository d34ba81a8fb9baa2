"""Trajectory transport over one Redis stream: actors publish, the learner's consumer group reads.

Delivery is at-least-once. Each entry is `{seq: <n>, data: <codec bytes>}` where `seq` is the
stream's own 1-based publish counter, assigned atomically with the XADD by a Lua script. A
numbered producer (`publish(..., origin=(producer, pseq))`) adds `producer` and `pseq`, its own
1-based count of the trajectories it produced: the consumer's `on_origin` callback sees every
entry's origin (dead-lettered ones too), so it can count what never arrived (gaps), whether
Redis trimmed it, lost it in a crash, or the producer dropped it from its local buffer. A
consumer acks an entry only after its effect is durable (the learner: after checkpointing);
after a crash it re-reads its own unacked entries with `pending_own`, and a different consumer
takes over a dead one's with `claim_stale` (XAUTOCLAIM). A producer retry after a dropped
connection can add an entry twice, so the learner should ignore a `request_id` it has applied.

Backpressure (`TransportConfig.backpressure`), memory is bounded under both policies:
  "drop-oldest" (default): XADD ... MAXLEN ~ maxlen; the producer never waits. Entries the group
      had not read yet when trimmed are *dropped*: `dropped_count()` = highest `seq` delivered to
      the group - entries the group has read (Redis's `entries-read` counter), so a drop is
      counted once the group reads past it. Read-but-unacked entries can be trimmed too; those
      are found by `claim_stale`/`pending_own`, acked, and counted as `trimmed_pending`.
  "block": before adding, the script reads the group's backlog (lag + pending, from XINFO
      GROUPS; the stream length when no group exists yet) and refuses while it is >= high_water
      (<= maxlen), so nothing unacked is trimmed; the producer polls with backoff and raises
      `BackpressureTimeout` after `block_timeout_s`. Check and add are one atomic script.
Worst-case stream memory is about (maxlen + 100) x max_message_bytes (approximate trimming cuts
whole nodes of up to 100 entries); the dead-letter stream is bounded by dead_letter_maxlen.

A malformed entry (undecodable, oversized, failing `Trajectory.validate`, or, given
`RecordLimits`, not fitting the consumer's model) is copied to the dead-letter stream with its
reason, acked, counted, and skipped; consumption goes on.

Connection errors are retried by the client itself (redis-py's Retry, see common.transport.redis.client);
what is left after those retries raises ServiceError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from common.core.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CodecError,
    RecordLimits,
    decode_trajectory,
    encode_trajectory,
)
from common.core.errors import ServiceError
from common.transport.redis.client import check_bytes_client, redis_call
from common.transport.protocols import Origin, StreamStats
from common.core.types import Trajectory
from common.core.config import require

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKPRESSURE_POLICIES = ("drop-oldest", "block")

# KEYS: stream, seq counter. ARGV: maxlen, payload, group, high_water (0 = no check), then the
# origin fields (producer, pseq) when numbered.
# Returns {seq, id} when added, {0, backlog} when the block policy refuses.
_PUBLISH_LUA = """
local high_water = tonumber(ARGV[4])
if high_water > 0 then
  local backlog = nil
  if redis.call('EXISTS', KEYS[1]) == 1 then
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == ARGV[3] and f['lag'] then backlog = f['lag'] + f['pending'] end
    end
  end
  if backlog == nil then backlog = redis.call('XLEN', KEYS[1]) end
  if backlog >= high_water then return {0, backlog} end
end
local seq = redis.call('INCR', KEYS[2])
local id
if #ARGV >= 6 then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'data', ARGV[2],
                  'producer', ARGV[5], 'pseq', ARGV[6])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'seq', seq, 'data', ARGV[2])
end
return {seq, id}
"""

# KEYS: high-water key. ARGV: candidate seq. Keeps the max; commutative across consumers.
_MAX_LUA = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1]) return new end
return cur
"""




def _check_name(field: str, value: str) -> None:
    require(
        isinstance(value, str) and value != "" and not any(c.isspace() for c in value),
        f"{field} must be a non-empty name without spaces, got {value!r}",
    )


@dataclass(frozen=True)
class TransportConfig:
    """Where trajectories travel in Redis and how the stream is bounded."""

    namespace: str = "dvi"
    """Prefix of every key, so several runs (or tests) can share one Redis."""
    stream: str = "trajectories"
    """Stream name under the namespace; the key is f"{namespace}:{stream}"."""
    group: str = "learner"
    """Consumer group the learner reads with."""
    maxlen: int = 1_000
    """Approximate bound on stream entries (XADD MAXLEN ~)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest encoded trajectory accepted on publish and on consume."""
    dead_letter_stream: str = "trajectories:dead"
    """Stream name (under the namespace) that receives malformed entries."""
    dead_letter_maxlen: int = 1_000
    """Approximate bound on dead-letter entries; the total count is kept separately."""
    backpressure: str = "drop-oldest"
    """What a producer does when the learner falls behind: drop-oldest or block."""
    high_water: int = 800
    """block policy: the producer waits while the group's lag + pending is >= this (<= maxlen)."""
    block_timeout_s: float = 30.0
    """block policy: longest a producer waits before raising BackpressureTimeout."""
    block_poll_s: float = 0.05
    """block policy: first re-check delay; doubles up to 1 s."""

    def __post_init__(self) -> None:
        for name in ("namespace", "stream", "group", "dead_letter_stream"):
            _check_name(name, getattr(self, name))
        require(
            self.dead_letter_stream != self.stream,
            f"dead_letter_stream must differ from stream {self.stream!r}",
        )
        require(self.maxlen >= 1, f"maxlen must be >= 1, got {self.maxlen}")
        require(self.max_message_bytes >= 1, f"max_message_bytes must be >= 1, got {self.max_message_bytes}")
        require(
            self.dead_letter_maxlen >= 1, f"dead_letter_maxlen must be >= 1, got {self.dead_letter_maxlen}"
        )
        require(
            self.backpressure in BACKPRESSURE_POLICIES,
            f"backpressure must be one of {BACKPRESSURE_POLICIES}, got {self.backpressure!r}",
        )
        require(
            1 <= self.high_water <= self.maxlen,
            f"high_water must be in [1, maxlen={self.maxlen}], got {self.high_water}",
        )
        require(self.block_timeout_s > 0, f"block_timeout_s must be > 0, got {self.block_timeout_s}")
        require(self.block_poll_s > 0, f"block_poll_s must be > 0, got {self.block_poll_s}")

    @property
    def stream_key(self) -> str:
        return f"{self.namespace}:{self.stream}"

    @property
    def dead_letter_key(self) -> str:
        return f"{self.namespace}:{self.dead_letter_stream}"


class BackpressureTimeout(ServiceError):
    """The block policy waited block_timeout_s and the learner's backlog stayed at the high-water mark."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry: the original entry id, why it was refused, and its (capped) payload."""

    id: str
    original_id: str
    reason: str
    payload: bytes
    consumer: str
    timestamp: float


class TrajectoryStream:
    """Publish and consume `Trajectory` records on the stream described by a `TransportConfig`.

    `client` must return bytes (decode_responses=False). One instance may serve producers and
    consumers; its counters are per instance. Entry ids are returned as str. A consumer passes
    `limits` to dead-letter records that do not fit its model, and `on_origin(producer, pseq)`
    to see the origin of every numbered entry it reads (decoded or dead-lettered).
    """

    def __init__(
        self,
        client: redis.Redis,
        config: TransportConfig = TransportConfig(),
        *,
        limits: RecordLimits | None = None,
        on_origin: Callable[[str, int], None] | None = None,
    ) -> None:
        check_bytes_client(client)
        self.client = client
        self.config = config
        self.limits = limits
        self.on_origin = on_origin
        self._key = config.stream_key
        self._seq_key = f"{self._key}:seq"
        self._delivered_key = f"{self._key}:group:{config.group}:delivered-seq"
        self._dl_count_key = f"{config.dead_letter_key}:count"
        self._publish_script = client.register_script(_PUBLISH_LUA)
        self._max_script = client.register_script(_MAX_LUA)
        self._group_ready = False
        self._published = self._rejected = self._consumed = self._dead_lettered = self._trimmed_pending = 0

    # ---- producer -------------------------------------------------------------------------

    def publish(self, traj: Trajectory, origin: Origin | None = None) -> str:
        """Encode and add one trajectory (numbered by `origin` when given); return its entry id.

        Raises CodecError (nothing sent, counted as rejected) if it is invalid or larger than
        max_message_bytes, BackpressureTimeout under the block policy, ServiceError if Redis stays
        unreachable.
        """
        data = self.encode(traj)
        entry_id = self.publish_raw(data, origin)
        log.debug(
            "stream %s: published request %s weight version %d as %s",
            self._key,
            traj.request_id,
            traj.weight_version,
            entry_id,
        )
        return entry_id

    def encode(self, traj: Trajectory) -> bytes:
        """The wire bytes of `traj`; CodecError (counted as rejected) if invalid or too large."""
        try:
            return encode_trajectory(traj, self.config.max_message_bytes)
        except CodecError as err:
            self._rejected += 1
            log.warning(
                "stream %s: refused request %s (weight version %s): %s",
                self._key,
                getattr(traj, "request_id", "?"),
                getattr(traj, "weight_version", "?"),
                err,
            )
            raise

    def publish_raw(self, data: bytes, origin: Origin | None = None) -> str:
        """Add `data` as an entry's payload unchecked (encoded by `encode`, or a test's poison);
        return its id. Retrying the same (data, origin) after a ServiceError is safe: the consumer
        dedupes by request id and by origin."""
        cfg = self.config
        high_water = cfg.high_water if cfg.backpressure == "block" else 0
        extra: list[object] = []
        if origin is not None:
            producer, pseq = origin
            _check_name("producer", producer)
            require(isinstance(pseq, int) and pseq >= 1, f"pseq must be an int >= 1, got {pseq!r}")
            extra = [producer, pseq]
        deadline = time.monotonic() + cfg.block_timeout_s
        delay = cfg.block_poll_s
        while True:
            seq, result = self._retry(
                lambda: self._publish_script(
                    keys=[self._key, self._seq_key], args=[cfg.maxlen, data, cfg.group, high_water, *extra]
                ),
                "XADD",
            )
            if int(seq) > 0:
                self._published += 1
                return _text(result)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackpressureTimeout(
                    f"stream {self._key}: learner backlog {result} >= high-water {cfg.high_water} for "
                    f"{cfg.block_timeout_s:g} s: is the learner consuming group {cfg.group!r}?"
                )
            log.debug("stream %s: backlog %s >= high-water %d, waiting", self._key, result, cfg.high_water)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    # ---- consumer -------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the stream and the consumer group at the first entry if missing (idempotent).

        The group starts with entries-read = 0 so entries trimmed before it existed count as dropped.
        """

        def create() -> None:
            try:
                self.client.xgroup_create(self._key, self.config.group, id="0", mkstream=True, entries_read=0)
                log.info("stream %s: created consumer group %s", self._key, self.config.group)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

        self._retry(create, "XGROUP CREATE")
        self._group_ready = True

    def consume(
        self, consumer: str, count: int, block_ms: int = 0
    ) -> list[tuple[str, Trajectory]]:
        """Read up to `count` new entries for `consumer`, waiting up to `block_ms` (0: no wait;
        keep it below the client's socket timeout). The consumer's settings (how many, how long)
        are the learner loop's (`learner.loop.LearnerLoopConfig`), not the stream's.

        Returns (entry id, trajectory) in stream order; they stay pending until `ack`. Malformed
        entries are dead-lettered (and acked) instead of returned.
        """
        _check_name("consumer", consumer)
        require(count >= 1 and block_ms >= 0, f"need count >= 1 and block_ms >= 0, got {count}, {block_ms}")
        entries = self._read_group(consumer, ">", count, block_ms or None)
        seqs = [int(f[b"seq"]) for _, f in entries if f and f.get(b"seq", b"").isdigit()]
        if seqs:
            self._retry(
                lambda: self._max_script(keys=[self._delivered_key], args=[max(seqs)]), "delivered seq"
            )
        return self._decode_batch(consumer, entries)

    def pending_own(
        self, consumer: str, count: int = 100, after: str = "0"
    ) -> list[tuple[str, Trajectory]]:
        """Re-read `consumer`'s own delivered-but-unacked entries with ids > `after` (crash replay).

        Returns up to `count` of them, oldest first; ack them (or pass the last id as `after`) to
        get the next ones. Malformed ones are dead-lettered; trimmed ones are acked and counted.
        """
        _check_name("consumer", consumer)
        return self._decode_batch(consumer, self._read_group(consumer, after, count, None))

    def claim_stale(
        self, consumer: str, min_idle_ms: int, count: int = 100
    ) -> list[tuple[str, Trajectory]]:
        """Take over at most `count` entries idle in any consumer's pending list for >= `min_idle_ms`.

        Loops the XAUTOCLAIM cursor until the pending list is scanned or `count` are claimed.
        Claimed entries now belong to `consumer` (pending until acked).
        """
        _check_name("consumer", consumer)
        min_idle = min_idle_ms
        require(count >= 1 and min_idle >= 0, f"need count >= 1 and min_idle_ms >= 0, got {count}, {min_idle}")
        self._ensure_group_once()
        cursor: bytes | str = "0-0"
        claimed: list[tuple[str, dict | None]] = []
        while len(claimed) < count:
            left = count - len(claimed)
            reply = self._retry(
                lambda start=cursor, left=left: self.client.xautoclaim(
                    self._key, self.config.group, consumer, min_idle, start_id=start, count=left
                ),
                "XAUTOCLAIM",
            )
            cursor, entries = reply[0], reply[1]
            claimed.extend((_text(entry_id), fields) for entry_id, fields in entries)
            gone = reply[2] if len(reply) > 2 else []
            if gone:  # XAUTOCLAIM already removed these from the pending list
                self._trimmed_pending += len(gone)
                log.warning(
                    "stream %s: %d pending entries were trimmed before being acked: %s",
                    self._key,
                    len(gone),
                    [_text(g) for g in gone][:5],
                )
            if _text(cursor) == "0-0":
                break
        if claimed:
            log.info("stream %s: consumer %s claimed %d stale entries", self._key, consumer, len(claimed))
        return self._decode_batch(consumer, claimed)

    def ack(self, entry_ids: Sequence[str]) -> int:
        """Acknowledge entries (their effect is durable); return how many were pending."""
        if not entry_ids:
            return 0
        return int(self._retry(lambda: self.client.xack(self._key, self.config.group, *entry_ids), "XACK"))

    # ---- inspection -----------------------------------------------------------------------

    def clear(self) -> None:
        """Drop every entry of the stream (its group, pending list and counters stay): a finished
        run frees the trajectory payloads once all are applied and acked."""
        self._retry(lambda: self.client.xtrim(self._key, maxlen=0), "XTRIM")

    def length(self) -> int:
        """Entries now in the stream (read or not)."""
        return int(self._retry(lambda: self.client.xlen(self._key), "XLEN"))

    def pending_count(self) -> int:
        """Entries delivered to the group and not yet acked, over all consumers."""
        self._ensure_group_once()
        return int(
            self._retry(lambda: self.client.xpending(self._key, self.config.group), "XPENDING")["pending"]
        )

    def dead_letter_count(self) -> int:
        """Entries ever dead-lettered on this stream (by any consumer); the stream itself is trimmed."""
        return int(self._retry(lambda: self.client.get(self._dl_count_key), "GET") or 0)

    def read_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The oldest `count` entries still in the dead-letter stream."""
        entries = self._retry(lambda: self.client.xrange(self.config.dead_letter_key, count=count), "XRANGE")
        return [
            DeadLetter(
                id=_text(entry_id),
                original_id=_text(f[b"original_id"]),
                reason=_text(f[b"reason"]),
                payload=f[b"payload"],
                consumer=_text(f[b"consumer"]),
                timestamp=float(f[b"timestamp"]),
            )
            for entry_id, f in entries
        ]

    def dropped_count(self) -> int | None:
        """Entries trimmed before the group read them: highest seq delivered - entries the group read.

        Counted once the group reads past a gap. None if the group is missing or Redis lost its
        entries-read counter (after XDEL or XGROUP SETID on this stream).
        """

        found = self._group_info(lambda pipe: pipe.get(self._delivered_key))
        if found is None:  # no such key: nothing was ever published or grouped
            return 0
        group, delivered = found
        if group is None:
            return None
        entries_read = group.get("entries-read")
        return None if entries_read is None else int(delivered or 0) - int(entries_read)

    @property
    def name(self) -> str:
        """The stream's name within its namespace: the label of its metrics."""
        return self.config.stream

    def lag(self) -> int | None:
        """Entries in the stream the group has not read yet: 0 when the stream does not exist or
        the group has been delivered its newest entry, None when Redis cannot tell (after trims
        or deletions).

        Redis's own `lag` comes from the group's entries-read counter, which an AOF reload can
        reset (seen with Redis 7.0: entries-read 0, lag = stream length, everything delivered), so
        a group whose last-delivered id is the stream's newest entry counts as caught up."""
        found = self._group_info(lambda pipe: pipe.xinfo_stream(self._key))
        if found is None or found[0] is None:  # no stream, or no group: nothing to read for it
            return 0
        group, info = found
        newest = info.get("last-entry")
        if newest is None or _id_key(group["last-delivered-id"]) >= _id_key(newest[0]):
            return 0
        return None if group.get("lag") is None else int(group["lag"])

    def _group_info(self, also: Callable[[Any], object]) -> tuple[dict | None, Any] | None:
        """(this group's XINFO GROUPS entry or None, the reply of `also(pipe)`) read in one
        transaction; None when the stream does not exist."""

        def read() -> list:
            pipe = self.client.pipeline(transaction=True)
            pipe.xinfo_groups(self._key)
            also(pipe)
            return pipe.execute()

        try:
            groups, extra = self._retry(read, "XINFO")
        except redis.ResponseError:  # no such key
            return None
        mine = [g for g in groups if _text(g["name"]) == self.config.group]
        return (mine[0] if mine else None), extra

    def stats(self) -> StreamStats:
        """This instance's counters and the stream-wide drop count (one Redis round trip)."""
        return StreamStats(
            published=self._published,
            rejected=self._rejected,
            consumed=self._consumed,
            dead_lettered=self._dead_lettered,
            trimmed_pending=self._trimmed_pending,
            dropped=self.dropped_count(),
        )

    # ---- internals ------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return redis_call(fn, what=f"{what} on {self._key}")

    def _ensure_group_once(self) -> None:
        if not self._group_ready:
            self.ensure_group()

    def _read_group(
        self, consumer: str, start: str, count: int, block: int | None
    ) -> list[tuple[str, dict | None]]:
        """XREADGROUP from `start` (">" new, an id: own pending after it); recreates a lost group once."""
        self._ensure_group_once()

        def read() -> object:
            return self.client.xreadgroup(
                self.config.group, consumer, {self._key: start}, count=count, block=block
            )

        try:
            reply = self._retry(read, "XREADGROUP")
        except redis.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            log.warning("stream %s: group %s vanished; recreating it", self._key, self.config.group)
            self.ensure_group()
            reply = self._retry(read, "XREADGROUP")
        streams = reply.items() if isinstance(reply, dict) else (reply or [])
        return [(_text(entry_id), fields) for _, entries in streams for entry_id, fields in entries]

    def _decode_batch(
        self, consumer: str, entries: list[tuple[str, dict | None]]
    ) -> list[tuple[str, Trajectory]]:
        out: list[tuple[str, Trajectory]] = []
        trimmed: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # a pending entry whose stream entry was trimmed away
                trimmed.append(entry_id)
                continue
            self._note_origin(entry_id, fields)
            payload = fields.get(b"data")
            if payload is None:
                self.dead_letter(consumer, entry_id, "entry has no data field", b"")
                continue
            try:
                out.append((entry_id, decode_trajectory(payload, self.config.max_message_bytes, self.limits)))
            except CodecError as err:
                self.dead_letter(consumer, entry_id, str(err), payload)
        if trimmed:
            self._trimmed_pending += len(trimmed)
            log.warning(
                "stream %s: %d pending entries of %s were trimmed before being acked",
                self._key,
                len(trimmed),
                consumer,
            )
            self.ack(trimmed)
        self._consumed += len(out)
        return out

    def _note_origin(self, entry_id: str, fields: dict) -> None:
        producer, pseq = fields.get(b"producer"), fields.get(b"pseq")
        if self.on_origin is None or producer is None or pseq is None:
            return
        try:
            number = int(pseq)
            name = producer.decode()
        except (ValueError, UnicodeDecodeError):
            log.warning("stream %s: entry %s has a malformed origin %r/%r", self._key, entry_id, producer, pseq)
            return
        if number >= 1 and len(name) <= 256:
            self.on_origin(name, number)

    def dead_letter(self, consumer: str, entry_id: str, reason: str, payload: bytes = b"") -> None:
        """Copy entry `entry_id` (with `payload`, truncated to the cap) to the dead-letter stream with
        `reason`, count it and ack it, in one transaction. Consumers call it for entries they refuse."""
        cfg = self.config
        fields = {
            "original_id": entry_id,
            "reason": reason,
            "payload": payload[: cfg.max_message_bytes],
            "consumer": consumer,
            "timestamp": repr(time.time()),
        }

        def move() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(cfg.dead_letter_key, fields, maxlen=cfg.dead_letter_maxlen, approximate=True)
            pipe.incr(self._dl_count_key)
            pipe.xack(self._key, cfg.group, entry_id)
            pipe.execute()

        self._retry(move, "dead-letter")
        self._dead_lettered += 1
        log.warning(
            "stream %s: dead-lettered entry %s (%d bytes) read by %s: %s",
            self._key,
            entry_id,
            len(payload),
            consumer,
            reason,
        )


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id "ms-seq" as a comparable pair."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
