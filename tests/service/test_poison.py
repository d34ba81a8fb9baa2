"""Issue 14's poison test: every poison kind interleaved with 100 good records, the learner killed
midway. The learner stays alive, applies all 100 exactly once, dead-letters every poison with its
reason, and finds no hole in the producer's numbering.

A real `Learner` on stories260K (exit layer 2) reads a real Redis stream under a fresh
namespace. "Killed" = the loop is dropped between two checkpoints with entries read but not
acked; a new Learner resumes from the checkpoint on the same consumer name, as a restarted Ray
actor does.
"""

from __future__ import annotations

import math

import msgpack
import pytest
import torch

from common.core.codec import encode_trajectory
from common.transport.redis.streams import TrajectoryStream, TransportConfig
from common.transport.redis.weights import WeightStore
from learner.accounting import ProducerGaps
from learner.config import LearnerConfig
from learner.learner import Learner
from learner.service import LearnerLoop, LearnerLoopConfig, record_limits
from tests.helpers import make_trajectory
from tests.tiny_models import stories_split

pytestmark = pytest.mark.slow

EXIT_LAYER, HIDDEN, VOCAB = 2, 64, 512  # stories260K cut at layer 2


def good(i: int):
    return make_trajectory(n_drafted=6, hidden=HIDDEN, vocab=VOCAB, k=8, exit_layer=EXIT_LAYER, seed=i,
                           request_id=f"good-{i:03d}")


def _wire(traj) -> dict:
    return msgpack.unpackb(encode_trajectory(traj), raw=False)


def _pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def poisons() -> list[tuple[str, bytes | None]]:
    """(kind, payload; None = an entry without a data field). Each one once."""
    out: list[tuple[str, bytes | None]] = [("garbage", b"\xc1\x00not msgpack"), ("no data field", None)]

    def mutated(kind, mutate, seed):
        message = _wire(good(1000 + seed))
        message["scalars"]["request_id"] = f"poison-{seed}"
        mutate(message)
        out.append((kind, _pack(message)))

    mutated("schema version", lambda m: m.update(schema_version=99), 0)
    mutated("zero next to a huge dimension", lambda m: m["tensors"]["verified_topk_ids"].update(shape=[0, 2**62]), 1)
    mutated("65 dimensions", lambda m: m["tensors"]["token"].update(shape=[1] * 65), 2)
    mutated("wrong dtype", lambda m: m["tensors"]["token"].update(dtype="float32"), 3)
    mutated("byte count", lambda m: m["tensors"]["token"].update(data=b"\x00" * 3), 4)
    mutated("7 MB request id", lambda m: m["scalars"].update(request_id="r" * 7_000_000), 5)
    for seed, (kind, change) in enumerate([
        ("token id outside the vocabulary", lambda t: t.token.__setitem__(0, VOCAB + 7)),
        ("top-k id outside the vocabulary", lambda t: t.verifier_topk_ids.__setitem__((0, 0), 10**9)),
        ("NaN log-probability", lambda t: t.drafter_logprob.__setitem__(0, math.nan)),
        ("another exit layer", lambda t: setattr(t, "exit_layer", EXIT_LAYER + 1)),
    ]):
        traj = good(2000 + seed)
        traj.request_id = f"poison-model-{seed}"
        change(traj)
        out.append((kind, _pack(_wire(traj)) if kind != "another exit layer" else encode_trajectory(traj)))
    wrong_hidden = make_trajectory(n_drafted=6, hidden=HIDDEN * 2, vocab=VOCAB, k=8, exit_layer=EXIT_LAYER,
                                   seed=3000, request_id="poison-hidden")
    out.append(("wrong hidden size", encode_trajectory(wrong_hidden)))
    nan_hidden = _wire(good(3001))
    nan_hidden["scalars"]["request_id"] = "poison-nan-hidden"
    nan_hidden["tensors"]["hidden"]["data"] = b"\x00\x7e" * (len(nan_hidden["tensors"]["hidden"]["data"]) // 2)
    out.append(("non-finite hidden", _pack(nan_hidden)))
    return out


def _loop(split, client, ns, ckpt, gaps: ProducerGaps) -> LearnerLoop:
    learner = Learner(split, LearnerConfig(batch_tokens=32, max_staleness=100))
    stream = TrajectoryStream(client, TransportConfig(namespace=ns), limits=record_limits(split), on_origin=gaps.observe)
    config = LearnerLoopConfig(checkpoint_dir=str(ckpt), checkpoint_every_steps=3, checkpoint_every_s=1e6,
                               publish_every_steps=1000, publish_every_s=1e6, block_ms=0, read_count=8)
    return LearnerLoop(learner, stream, WeightStore(client, ns), config, accounting=gaps)


def test_poison_records_are_dead_lettered_and_every_good_one_applied_once_across_a_kill(
    redis_client, redis_ns, tmp_path
):
    kinds = poisons()
    producer = TrajectoryStream(redis_client, TransportConfig(namespace=redis_ns))
    bad_at = {10 + 7 * i for i in range(len(kinds))}  # poison interleaved with the good records
    sent_good = sent_bad = 0
    for slot in range(100 + len(kinds)):
        if slot in bad_at:
            kind, payload = kinds[sent_bad]
            if payload is None:
                redis_client.xadd(f"{redis_ns}:trajectories", {"seq": 0, "junk": kind})
            else:
                producer.publish_raw(payload)
            sent_bad += 1
        else:
            sent_good += 1
            producer.publish(good(sent_good), origin=("actor-0.1.abc", sent_good))
    assert (sent_good, sent_bad) == (100, len(kinds)) and len(kinds) >= 14

    split = stories_split(EXIT_LAYER)
    ckpt = tmp_path / "ckpt"
    first = _loop(split, redis_client, redis_ns, ckpt, ProducerGaps())
    first.start()
    for _ in range(12):  # about half the stream: some of it checkpointed and acked, some not
        first.poll(block_ms=0)
        if first.learner.counters()["added"] >= 40 and first.stream.pending_count() > 0:
            break
    assert first.counters["checkpoints"] >= 1 and 0 < first.learner.counters()["added"] < 100
    assert first.stream.pending_count() > 0  # read but not acked: what the kill must not lose
    del first  # killed: no finish, no checkpoint

    second = _loop(stories_split(EXIT_LAYER), redis_client, redis_ns, ckpt, ProducerGaps())
    info = second.start()
    assert info["resumed"] and info["replayed"] > 0
    while second.poll(block_ms=0):
        pass
    second.finish()

    counters = second.learner.counters()
    assert counters["added"] == 100, counters  # every good record, once (restored + after the restart)
    assert all(f"good-{i:03d}" in second.learner._seen for i in range(1, 101))
    stream = second.stream
    assert stream.pending_count() == 0 and stream.lag() == 0
    dead = stream.read_dead_letters(count=100)
    assert stream.dead_letter_count() == len(dead) == len(kinds)
    reasons = " | ".join(d.reason for d in dead)
    for needle in ("not a msgpack record", "no data field", "unsupported schema version", "dimension over",
                   "rank 65", "dtype float32", "bytes, expected", "request_id must have", "outside [0, 512)",
                   "not log-probabilities", "exit_layer 3", "hidden has 128 columns", "non-finite"):
        assert needle in reasons, (needle, reasons)
    assert second.accounting.lost() == 0 and second.accounting.highest() == {"actor-0.1.abc": 100}
    assert torch.isfinite(torch.cat([t.flatten() for t in split.adapter_state().values()])).all()
