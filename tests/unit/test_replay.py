"""Unit tests of learner.replay: capacity in tokens, eviction policies, seeded sampling, staleness, collate."""

from __future__ import annotations

import math

import pytest
import torch

from common.core.types import Trajectory
from learner.losses import kl_distillation
from learner.replay import (
    ReplayBuffer,
    collate,
    drop_oldest,
    filter_stale,
    importance_weights,
    is_stale,
)

VOCAB = 8


def make_traj(n: int, version: int = 0, k: int = 2, name: str = "r", accepted: list[bool] | None = None) -> Trajectory:
    """A valid Trajectory with `n` drafted tokens (one block), top-`k` verifier records, context n + 1."""
    acc = torch.tensor(accepted if accepted is not None else [True] * n, dtype=torch.bool)
    token = torch.arange(n, dtype=torch.int64) % VOCAB
    target = torch.where(acc, token, (token + 1) % VOCAB)
    ids = (target[:, None] + torch.arange(k)[None]) % VOCAB
    logprobs = torch.log(torch.linspace(0.5, 0.1, k))[None].expand(n, k).contiguous().float()
    return Trajectory(
        request_id=name,
        weight_version=version,
        exit_layer=1,
        temperature=0.0,
        created_at=0.0,
        prompt_length=1,
        hidden=torch.zeros(n + 1, 4, dtype=torch.float16),
        tokens=torch.zeros(n + 2, dtype=torch.int64),
        position=torch.arange(n, dtype=torch.int64),
        block_index=torch.arange(n, dtype=torch.int64),
        token=token,
        target_token=target,
        accepted=acc,
        drafter_logprob=torch.full((n,), -0.5, dtype=torch.float32),
        verifier_topk_ids=ids,
        verifier_topk_logprobs=logprobs,
        timestamp=torch.zeros(n, dtype=torch.float64),
        verified_position=torch.zeros(0, dtype=torch.int64),
        verified_topk_ids=torch.zeros(0, k, dtype=torch.int64),
        verified_topk_logprobs=torch.zeros(0, k, dtype=torch.float32),
    ).validate()


def names(trajs) -> list[str]:
    return [t.request_id for t in trajs]


# ----------------------------------------------------------------------------- capacity / eviction
def test_fifo_capacity_counts_drafted_tokens():
    buf = ReplayBuffer(capacity_tokens=10)
    assert buf.add(make_traj(4, name="a")) and buf.add(make_traj(4, name="b"))
    assert (len(buf), buf.num_tokens) == (2, 8)
    assert buf.add(make_traj(4, name="c"))  # 12 > 10: the oldest ("a") goes
    assert names(buf.trajectories()) == ["b", "c"] and buf.num_tokens == 8
    assert buf.add(make_traj(2, name="d"))  # 10 <= 10: nothing goes
    assert names(buf.trajectories()) == ["b", "c", "d"] and buf.num_tokens == 10
    c = buf.counters()
    assert (c["added"], c["added_tokens"], c["evicted"], c["evicted_tokens"]) == (4, 14, 1, 4)


def test_oversized_trajectory_is_evicted_without_flushing_the_buffer():
    buf = ReplayBuffer(capacity_tokens=10)
    buf.add(make_traj(4, name="a"))
    assert not buf.add(make_traj(11, name="huge"))  # can never fit: evicted alone
    assert names(buf.trajectories()) == ["a"]
    assert (buf.evicted, buf.evicted_tokens, buf.num_tokens) == (1, 11, 4)


def test_drop_oldest_is_a_pure_index_policy():
    trajs = [make_traj(3), make_traj(20), make_traj(3), make_traj(3)]
    # capacity 6: "20" never fits; then 9 > 6 -> evict index 0 -> 6
    assert drop_oldest(trajs, 6) == [0, 1]
    assert drop_oldest(trajs[2:], 6) == []
    # an oversized oldest one is evicted once, and the next oldest still makes room: 9 > 6 -> [0, 1]
    assert drop_oldest([make_traj(20), make_traj(3), make_traj(3), make_traj(3)], 6) == [0, 1]


def test_empty_trajectories_are_skipped():
    buf = ReplayBuffer(capacity_tokens=10)
    assert not buf.add(make_traj(0))
    assert (len(buf), buf.skipped_empty, buf.added) == (0, 1, 0)


def test_custom_eviction_policy_and_a_policy_that_overflows():
    def drop_newest(trajs, capacity):  # refuse incoming data when full
        total = sum(t.num_drafted for t in trajs)
        return [len(trajs) - 1] if total > capacity else []

    buf = ReplayBuffer(capacity_tokens=6, evict=drop_newest)
    assert buf.add(make_traj(3, name="a")) and buf.add(make_traj(3, name="b"))
    assert not buf.add(make_traj(3, name="c"))
    assert names(buf.trajectories()) == ["a", "b"] and buf.evicted == 1

    lazy = ReplayBuffer(capacity_tokens=4, evict=lambda trajs, cap: [])
    lazy.add(make_traj(3))
    with pytest.raises(ValueError, match="left 6 tokens in a buffer of 4"):
        lazy.add(make_traj(3))
    bad = ReplayBuffer(capacity_tokens=4, evict=lambda trajs, cap: [5])
    with pytest.raises(ValueError, match="outside"):
        bad.add(make_traj(3))


def test_buffer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="got 0"):
        ReplayBuffer(capacity_tokens=0)
    buf = ReplayBuffer(capacity_tokens=8)
    with pytest.raises(ValueError, match="Trajectory"):
        buf.add("not a trajectory")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_tokens"):
        buf.sample(0, torch.Generator())
    with pytest.raises(ValueError, match="Generator"):
        buf.sample(4, 0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sampling
def _filled(n: int = 20, size: int = 4) -> ReplayBuffer:
    buf = ReplayBuffer(capacity_tokens=1000)
    for i in range(n):
        buf.add(make_traj(size, name=f"t{i}"))
    return buf


def test_sampling_is_seeded_and_follows_randperm():
    buf = _filled()
    one = buf.sample(16, torch.Generator().manual_seed(7))
    two = buf.sample(16, torch.Generator().manual_seed(7))
    assert names(one) == names(two)
    # 16 tokens of 4-token trajectories: the first 4 of randperm(20) under the same seed
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(7)).tolist()
    assert names(one) == [f"t{i}" for i in perm[:4]]
    draws = {tuple(names(buf.sample(16, torch.Generator().manual_seed(s)))) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    assert len(buf) == 20  # sampling does not consume


def test_sample_takes_whole_trajectories_until_the_budget_is_met():
    buf = ReplayBuffer(capacity_tokens=1000)
    for i, n in enumerate([5, 1, 7, 3, 2, 6]):
        buf.add(make_traj(n, name=f"t{i}"))
    for seed in range(10):
        got = buf.sample(8, torch.Generator().manual_seed(seed))
        total = sum(t.num_drafted for t in got)
        assert len(set(names(got))) == len(got)  # without replacement
        assert total >= 8  # the budget is met...
        assert total - got[-1].num_drafted < 8  # ...and the last trajectory was needed to meet it
    assert len(buf.sample(1000, torch.Generator().manual_seed(0))) == 6  # exhausted: everything
    assert ReplayBuffer(capacity_tokens=8).sample(4, torch.Generator()) == []


# ----------------------------------------------------------------------------- staleness
def test_filter_stale_drop_counts_and_keeps_the_boundary():
    trajs = [make_traj(2, version=v, name=f"v{v}") for v in range(7)]
    kept, dropped = filter_stale(trajs, current_version=6, max_staleness=4, policy="drop")
    # stale iff version < 6 - 4 = 2: versions 0 and 1 go, version 2 stays
    assert names(kept) == ["v2", "v3", "v4", "v5", "v6"] and dropped == 2
    assert not is_stale(2, 6, 4) and is_stale(1, 6, 4)
    kept, dropped = filter_stale(trajs, current_version=6, max_staleness=4, policy="importance")
    assert len(kept) == 7 and dropped == 0
    kept, dropped = filter_stale(trajs, current_version=6, max_staleness=0, policy="drop")
    assert names(kept) == ["v6"] and dropped == 6
    with pytest.raises(ValueError, match="'newest'"):
        filter_stale(trajs, 6, 4, "newest")
    with pytest.raises(ValueError, match="-1"):
        filter_stale(trajs, 6, -1, "drop")


def test_buffer_drop_stale_updates_counters():
    buf = ReplayBuffer(capacity_tokens=100)
    for v, n in [(0, 3), (1, 5), (3, 2), (5, 4)]:
        buf.add(make_traj(n, version=v, name=f"v{v}"))
    assert buf.drop_stale(current_version=5, max_staleness=3, policy="drop") == 2  # versions < 2
    assert names(buf.trajectories()) == ["v3", "v5"]
    c = buf.counters()
    assert (c["dropped_stale"], c["dropped_stale_tokens"], c["num_tokens"]) == (2, 8, 6)
    assert buf.drop_stale(current_version=50, max_staleness=3, policy="importance") == 0
    assert len(buf) == 2


def test_importance_weights_are_clipped_ratios_without_grad():
    current = torch.tensor([0.0, math.log(3.0), math.log(0.5), -math.inf], requires_grad=True)
    behaviour = torch.zeros(4)
    w = importance_weights(current, behaviour, clip=2.0)
    # exp([0, ln 3, ln .5, -inf] - 0) = [1, 3, 0.5, 0] -> clip at 2 -> [1, 2, 0.5, 0]
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 0.5, 0.0]))
    assert not w.requires_grad
    # behaviour log q = ln 0.25, current ln 0.5: ratio 2 -> with clip 10 stays 2
    w = importance_weights(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), clip=10.0)
    assert w.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="clip must be > 0, got 0.0"):
        importance_weights(current, behaviour, clip=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        importance_weights(current, torch.zeros(3), clip=2.0)


# ----------------------------------------------------------------------------- collate
def test_collate_concatenates_and_pads_topk():
    a = make_traj(2, version=3, k=2, name="a", accepted=[True, False])
    b = make_traj(3, version=5, k=3, name="b", accepted=[True, True, False])
    batch = collate([a, b])
    assert batch.num_tokens == 5 and batch.sizes() == [2, 3]
    assert batch.trajectories == (a, b)
    assert batch.traj_index.tolist() == [0, 0, 1, 1, 1]
    assert batch.weight_version.tolist() == [3, 3, 5, 5, 5]
    assert batch.position.tolist() == [0, 1, 0, 1, 2]
    assert batch.token.tolist() == [0, 1, 0, 1, 2]
    assert batch.target_token.tolist() == [0, 2, 0, 1, 3]  # rejected rows hold the correction token + 1
    assert batch.accepted.tolist() == [True, False, True, True, False]
    assert batch.reward.dtype == torch.float32 and batch.reward.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert batch.verifier_topk_ids.shape == (5, 3) and batch.verifier_topk_logprobs.shape == (5, 3)
    # a's rows are padded with id 0 and log-prob -inf
    assert batch.verifier_topk_ids[:2, 2].tolist() == [0, 0]
    assert batch.verifier_topk_logprobs[:2, 2].tolist() == [-math.inf, -math.inf]
    torch.testing.assert_close(batch.verifier_topk_logprobs[2:], b.verifier_topk_logprobs)
    moved = batch.to("cpu")
    assert moved.trajectories == batch.trajectories and torch.equal(moved.token, batch.token)
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_collated_padding_does_not_change_the_kl():
    a = make_traj(2, k=2, name="a")
    b = make_traj(3, k=4, name="b")
    batch = collate([a, b])
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(3))
    together, _ = kl_distillation(logits, batch.verifier_topk_ids, batch.verifier_topk_logprobs)
    ka, _ = kl_distillation(logits[:2], a.verifier_topk_ids, a.verifier_topk_logprobs)
    kb, _ = kl_distillation(logits[2:], b.verifier_topk_ids, b.verifier_topk_logprobs)
    # the mean over 5 positions = (2 * mean_a + 3 * mean_b) / 5
    assert together.item() == pytest.approx((2 * ka.item() + 3 * kb.item()) / 5, abs=1e-6)
