"""TrajectoryStream against a real Redis: delivery, bounding, dead letters, crash recovery."""

from __future__ import annotations

import dataclasses
import threading
import time

import msgpack
import pytest
import redis

from common.core.codec import CodecError, encode_trajectory
from common.core.errors import ServiceError
from common.transport.redis.client import connect, free_port
from common.transport.redis.streams import BackpressureTimeout, TrajectoryStream, TransportConfig
from common.core.types import SCHEMA_VERSION, Trajectory
from tests.helpers import assert_trajectories_equal, make_trajectory

BASE = make_trajectory(n_drafted=3, hidden=8, k=2, seed=11)


def _traj(i: int) -> Trajectory:
    """A small valid trajectory whose request_id is f"r{i}"."""
    return dataclasses.replace(BASE, request_id=f"r{i}")


def _stream(client: redis.Redis, ns: str, **overrides) -> TrajectoryStream:
    return TrajectoryStream(client, TransportConfig(namespace=ns, **overrides))


def _drain(stream: TrajectoryStream, consumer: str, ack: bool = True) -> list[tuple[str, Trajectory]]:
    got: list[tuple[str, Trajectory]] = []
    while batch := stream.consume(consumer, count=100, block_ms=0):
        got += batch
        if ack:
            stream.ack([entry_id for entry_id, _ in batch])
    return got


def test_publish_consume_ack(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns)
    stream.ensure_group()
    sent = [make_trajectory(n_drafted=i, hidden=8, seed=i, request_id=f"r{i}") for i in range(5)]
    ids = [stream.publish(t) for t in sent]
    got = stream.consume("learner-0", count=10, block_ms=0)
    assert [entry_id for entry_id, _ in got] == ids
    for (_, received), original in zip(got, sent, strict=True):
        assert_trajectories_equal(received, original)
    assert stream.pending_count() == 5
    assert stream.ack(ids[:2]) == 2 and stream.ack(ids) == 3  # acking twice counts once
    assert stream.pending_count() == 0
    assert stream.consume("learner-0", count=10, block_ms=0) == []
    stats = stream.stats()
    assert (stats.published, stats.consumed, stats.dead_lettered, stats.dropped) == (5, 5, 0, 0)


def test_consume_waits_block_ms_then_returns_empty(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns)
    start = time.monotonic()
    assert stream.consume("learner-0", count=1, block_ms=150) == []
    assert time.monotonic() - start >= 0.14


def test_maxlen_bounds_the_stream_and_counts_unread_drops(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns, maxlen=50, high_water=50)
    stream.ensure_group()
    for i in range(30):
        stream.publish(_traj(i))
    first = stream.consume("learner-0", count=20, block_ms=0)  # r0..r19 read before any trim
    assert [t.request_id for _, t in first] == [f"r{i}" for i in range(20)]
    for i in range(30, 400):
        stream.publish(_traj(i))
    # MAXLEN ~ trims whole nodes (<= 100 entries each), never below maxlen
    assert 50 <= stream.length() <= 150
    rest = _drain(stream, "learner-0")
    n = len(rest)
    # the survivors are exactly the newest n, in order
    assert [t.request_id for _, t in rest] == [f"r{i}" for i in range(400 - n, 400)]
    assert stream.dropped_count() == 400 - 20 - n > 0
    assert stream.stats().dropped == 400 - 20 - n


def test_entries_trimmed_before_the_group_exists_count_as_dropped(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns, maxlen=10, high_water=10)
    for i in range(300):
        stream.publish(_traj(i))
    got = _drain(stream, "learner-0")  # creates the group at the first entry
    assert got[-1][1].request_id == "r299"
    assert stream.dropped_count() == 300 - len(got)


def test_malformed_entries_are_dead_lettered_and_good_ones_keep_flowing(redis_client, redis_ns) -> None:
    cap = 4096
    stream = _stream(redis_client, redis_ns, max_message_bytes=cap)
    stream.ensure_group()
    big = make_trajectory(n_drafted=4, n_context=64, hidden=64, seed=3)  # 64 x 64 float16 alone is 8 KiB
    big_bytes = encode_trajectory(big, max_bytes=1 << 20)
    wrong_schema = msgpack.unpackb(encode_trajectory(_traj(0)), raw=False)
    wrong_schema["schema_version"] = 99
    good_1 = stream.publish(_traj(1))
    garbage = stream.publish_raw(b"\xc1 definitely not msgpack")
    oversized = stream.publish_raw(big_bytes)
    good_2 = stream.publish(_traj(2))
    schema = stream.publish_raw(msgpack.packb(wrong_schema, use_bin_type=True))
    good_3 = stream.publish(_traj(3))

    got = stream.consume("learner-0", count=10, block_ms=0)
    assert [(entry_id, t.request_id) for entry_id, t in got] == [
        (good_1, "r1"),
        (good_2, "r2"),
        (good_3, "r3"),
    ]
    letters = {letter.original_id: letter for letter in stream.read_dead_letters()}
    assert set(letters) == {garbage, oversized, schema}
    assert letters[garbage].reason.startswith("not a msgpack record")
    assert letters[garbage].payload == b"\xc1 definitely not msgpack"
    assert letters[oversized].reason == f"message too large: {len(big_bytes)} bytes > cap {cap}"
    assert letters[oversized].payload == big_bytes[:cap]  # truncated to the cap
    assert letters[schema].reason == f"unsupported schema version 99 (expected {SCHEMA_VERSION})"
    assert {letter.consumer for letter in letters.values()} == {"learner-0"}
    assert stream.dead_letter_count() == 3
    assert stream.pending_count() == 3  # dead letters are acked; the good ones await the learner
    assert stream.stats().dead_lettered == 3

    # an oversized trajectory is refused at publish and nothing is sent
    length = stream.length()
    with pytest.raises(CodecError, match=r"message too large: \d+ bytes > cap 4096"):
        stream.publish(big)
    assert stream.length() == length and stream.stats().rejected == 1


def test_claim_stale_hands_a_crashed_consumers_entries_over(redis_client, redis_ns) -> None:
    producer = _stream(redis_client, redis_ns)
    producer.ensure_group()
    ids = [producer.publish(_traj(i)) for i in range(5)]
    crashed = _stream(redis_client, redis_ns)
    assert len(crashed.consume("learner-a", count=5, block_ms=0)) == 5  # then dies without acking

    successor = _stream(redis_client, redis_ns)
    assert successor.claim_stale("learner-b", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.02)
    first = successor.claim_stale("learner-b", min_idle_ms=10, count=3)
    second = successor.claim_stale("learner-b", min_idle_ms=10)
    assert [e for e, _ in first] == ids[:3] and [e for e, _ in second] == ids[3:]
    assert [t.request_id for _, t in first + second] == [f"r{i}" for i in range(5)]
    pending = redis_client.xpending_range(f"{redis_ns}:trajectories", "learner", "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"learner-b"}
    successor.ack(ids)
    assert successor.pending_count() == 0


def test_pending_own_replays_unacked_entries_after_a_restart(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns)
    stream.ensure_group()
    ids = [stream.publish(_traj(i)) for i in range(6)]
    before = stream.consume("learner-0", count=4, block_ms=0)
    stream.ack([ids[0]])

    restarted = _stream(redis_client, redis_ns)
    replay = restarted.pending_own("learner-0", count=2)
    assert [e for e, _ in replay] == ids[1:3]
    page_2 = restarted.pending_own("learner-0", count=10, after=ids[2])
    assert [e for e, _ in page_2] == [ids[3]]
    assert_trajectories_equal(replay[0][1], before[1][1])
    assert restarted.pending_own("learner-1") == []  # only the consumer's own entries
    restarted.ack(ids[1:4])
    assert restarted.pending_own("learner-0") == []
    assert [e for e, _ in restarted.consume("learner-0", count=10, block_ms=0)] == ids[4:]


def test_ack_after_checkpoint_loses_nothing_and_applies_nothing_twice(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns)
    stream.ensure_group()
    sent = [f"r{i}" for i in range(37)]
    for i in range(len(sent)):
        stream.publish(_traj(i))

    checkpoint: list[str] = []  # durable: what the learner's checkpoint has applied
    learner, working, unacked, batches = stream, [], [], 0
    while True:
        batch = learner.consume("learner-0", count=4, block_ms=0)
        if not batch:
            break
        working += [t.request_id for _, t in batch]
        unacked += [e for e, _ in batch]
        batches += 1
        if batches % 3 == 0:  # checkpoint, then ack
            checkpoint += working
            learner.ack(unacked)
            working, unacked = [], []
        if batches in (4, 8):  # crash: volatile state is lost; restart replays its pending entries
            learner, working, unacked = _stream(redis_client, redis_ns), [], []
            replay = learner.pending_own("learner-0", count=100)
            working = [t.request_id for _, t in replay]
            unacked = [e for e, _ in replay]
    checkpoint += working
    learner.ack(unacked)
    assert sorted(checkpoint) == sorted(sent) and len(checkpoint) == len(set(checkpoint))
    assert stream.pending_count() == 0


def test_trimmed_pending_entries_are_acked_and_counted(redis_client, redis_ns) -> None:
    stream = _stream(redis_client, redis_ns, maxlen=5, high_water=5)
    stream.ensure_group()
    for i in range(6):
        stream.publish(_traj(i))
    assert len(stream.consume("learner-a", count=3, block_ms=0)) == 3
    assert len(stream.consume("learner-b", count=3, block_ms=0)) == 3
    for i in range(6, 300):  # both consumers' unacked entries are trimmed away
        stream.publish(_traj(i))
    assert stream.pending_own("learner-a") == []
    time.sleep(0.02)
    assert stream.claim_stale("learner-c", min_idle_ms=10) == []
    assert stream.stats().trimmed_pending == 6
    assert stream.pending_count() == 0


def test_block_policy_makes_the_producer_wait_instead_of_dropping(redis_client, redis_ns) -> None:
    stream = _stream(
        redis_client, redis_ns, backpressure="block", maxlen=10, high_water=3, block_timeout_s=0.2
    )
    for i in range(3):  # no group yet: the backlog is the stream length
        stream.publish(_traj(i))
    with pytest.raises(BackpressureTimeout, match="learner backlog 3 >= high-water 3"):
        stream.publish(_traj(3))
    assert stream.length() == 3
    got = stream.consume("learner-0", count=2, block_ms=0)
    with pytest.raises(BackpressureTimeout):  # read but unacked still counts: lag 1 + pending 2
        stream.publish(_traj(3))
    stream.ack([e for e, _ in got])
    stream.publish(_traj(3))  # backlog 1 + 0 < 3

    patient = _stream(
        redis_client, redis_ns, backpressure="block", maxlen=10, high_water=3, block_timeout_s=5.0
    )
    patient.publish(_traj(4))  # backlog now 3: the next publish must wait for the learner

    def learner() -> None:
        time.sleep(0.2)
        stream.ack([e for e, _ in stream.consume("learner-0", count=10, block_ms=0)])

    thread = threading.Thread(target=learner)
    thread.start()
    start = time.monotonic()
    patient.publish(_traj(5))
    waited = time.monotonic() - start
    thread.join()
    assert 0.15 <= waited < 5.0
    assert [t.request_id for _, t in _drain(stream, "learner-0")] == ["r5"]
    assert stream.dropped_count() == 0


def test_config_is_validated_with_the_bad_value_named() -> None:
    with pytest.raises(ValueError, match="high_water must be in \\[1, maxlen=10\\], got 11"):
        TransportConfig(maxlen=10, high_water=11)
    with pytest.raises(ValueError, match="backpressure must be one of .* got 'spill'"):
        TransportConfig(backpressure="spill")
    with pytest.raises(ValueError, match="group must be a non-empty name without spaces, got 'a b'"):
        TransportConfig(group="a b")
    assert TransportConfig(namespace="run1").stream_key == "run1:trajectories"


def test_text_clients_and_unreachable_redis_are_refused(redis_url) -> None:
    with pytest.raises(ValueError, match="decode_responses=False"):
        TrajectoryStream(redis.Redis.from_url(redis_url, decode_responses=True))
    dead = connect(f"redis://127.0.0.1:{free_port()}/0", retries=1, backoff_s=0.0, ping=False)
    stream = TrajectoryStream(dead, TransportConfig())
    with pytest.raises(ServiceError, match="XADD on dvi:trajectories failed: Redis unreachable"):
        stream.publish(_traj(0))
