"""Unit tests of learner.losses: every loss against numbers worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from learner.losses import (
    EmaBaseline,
    combined_loss,
    ema_update,
    entropy_bonus,
    gather_logprobs,
    kl_distillation,
    masked_mean,
    policy_gradient,
    reward_masked_ce,
    weighted_mean,
)
from learner.schedule import ScheduleWeights

LN = math.log


def assert_close(actual: torch.Tensor, expected: list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0.0)


def logits_of(*probs_rows: list[float]) -> torch.Tensor:
    """Free logits [N, V] (log-probs) with grad, one row per probability list."""
    return torch.tensor([[LN(p) for p in row] for row in probs_rows], dtype=torch.float32, requires_grad=True)


# ----------------------------------------------------------------------------- helpers
def test_masked_mean_and_weighted_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert masked_mean(x).item() == pytest.approx(3.0)  # 12 / 4
    assert masked_mean(x, torch.tensor([True, False, False, True])).item() == pytest.approx(3.5)  # (1 + 6) / 2
    assert masked_mean(x, torch.zeros(4, dtype=torch.bool)).item() == 0.0  # nothing selected -> 0
    assert weighted_mean(x, torch.tensor([1.0, 0.0, 0.0, 3.0])).item() == pytest.approx(4.75)  # (1 + 18) / 4
    assert weighted_mean(x, torch.zeros(4)).item() == 0.0
    assert masked_mean(torch.zeros(0)).item() == 0.0


def test_gather_logprobs_full_vocab_and_temperature():
    logits = torch.tensor([[LN(4.0), 0.0]])
    # T = 1: q = [4/5, 1/5]
    assert gather_logprobs(logits, torch.tensor([1])).tolist() == pytest.approx([LN(0.2)])
    # T = 2: logits / 2 = [ln 2, 0] -> q = [2/3, 1/3]
    assert_close(gather_logprobs(logits, torch.tensor([[0, 1]]), 2.0), [[LN(2 / 3), LN(1 / 3)]])


# ----------------------------------------------------------------------------- KL
def test_kl_full_vocab_hand_computed():
    drafter = torch.zeros(1, 2, requires_grad=True)  # q = [0.5, 0.5]
    ids = torch.tensor([[0, 1]])
    logp = torch.tensor([[LN(0.75), LN(0.25)]])
    loss, stats = kl_distillation(drafter, ids, logp, temperature=1.0)
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.75 * 0.405465 - 0.25 * 0.693147 = 0.130812
    assert loss.item() == pytest.approx(0.130812, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.130812, abs=1e-6)
    assert stats["verifier_topk_mass"] == pytest.approx(1.0)
    assert stats["drafter_topk_mass"] == pytest.approx(1.0)
    assert stats["top1_agreement"] == 1.0  # argmax of [0, 0] is id 0, the verifier's top-1
    loss.backward()
    # d KL / d logits = q - p = [0.5 - 0.75, 0.5 - 0.25]
    assert_close(drafter.grad, [[-0.25, 0.25]])


def test_kl_full_vocab_is_exact_in_any_id_order():
    torch.manual_seed(0)
    drafter = torch.randn(3, 7)
    verifier = torch.randn(3, 7)
    logp = torch.log_softmax(verifier, -1)
    perm = torch.stack([torch.randperm(7) for _ in range(3)])  # K == V, ids shuffled per row
    loss, _ = kl_distillation(drafter, perm, logp.gather(-1, perm))
    exact = torch.nn.functional.kl_div(torch.log_softmax(drafter, -1), logp, log_target=True, reduction="batchmean")
    assert loss.item() == pytest.approx(exact.item(), abs=1e-6)


def test_kl_of_identical_distributions_is_zero():
    torch.manual_seed(1)
    logits = torch.randn(4, 11, requires_grad=True)
    ids = torch.arange(11).expand(4, 11)
    for t in (1.0, 0.5, 3.0):
        loss, _ = kl_distillation(logits, ids, torch.log_softmax(logits.detach(), -1), temperature=t)
        assert abs(loss.item()) < 1e-6
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.abs().max().item() < 1e-6


def test_kl_temperature_rescales_both_sides_and_multiplies_by_t_squared():
    drafter = torch.tensor([[LN(4.0), 0.0]], requires_grad=True)
    logp = torch.tensor([[LN(0.75), LN(0.25)]])
    loss, _ = kl_distillation(drafter, torch.tensor([[0, 1]]), logp, temperature=2.0)
    # verifier at T=2: p ∝ [sqrt(.75), sqrt(.25)] = [0.866025, 0.5] -> p = [0.633975, 0.366025]
    # drafter at T=2: logits / 2 = [ln 2, 0] -> q = [2/3, 1/3]
    # KL = 0.633975 ln(0.633975 / 0.666667) + 0.366025 ln(0.366025 / 0.333333)
    #    = 0.633975 * (-0.050281) + 0.366025 * 0.093560 = -0.031877 + 0.034245 = 0.002368
    # times T^2 = 4 -> 0.009473
    p0 = math.sqrt(0.75) / (math.sqrt(0.75) + 0.5)
    expected = 4 * (p0 * LN(p0 / (2 / 3)) + (1 - p0) * LN((1 - p0) / (1 / 3)))
    assert expected == pytest.approx(0.009473, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_topk_renormalises_verifier_and_uses_full_vocab_drafter():
    # V = 4, verifier p = [0.5, 0.3, 0.1, 0.1], top-2 recorded: ids [0, 1], log-probs ln .5, ln .3
    drafter = torch.zeros(1, 4, requires_grad=True)  # q = 0.25 each
    ids = torch.tensor([[0, 1]])
    logp = torch.tensor([[LN(0.5), LN(0.3)]])
    loss, stats = kl_distillation(drafter, ids, logp)
    # p~ = [0.5, 0.3] / 0.8 = [0.625, 0.375]; q over the full vocab at those ids: [0.25, 0.25]
    # kl = 0.625 ln(0.625/0.25) + 0.375 ln(0.375/0.25) = 0.625 * 0.916291 + 0.375 * 0.405465 = 0.724731
    # check: KL(p~ || q_S) - ln q(S) = (0.625 ln 1.25 + 0.375 ln 0.75) + ln 2 = 0.031584 + 0.693147
    assert loss.item() == pytest.approx(0.724731, abs=1e-6)
    assert stats["verifier_topk_mass"] == pytest.approx(0.8)
    assert stats["drafter_topk_mass"] == pytest.approx(0.5)
    loss.backward()
    # gradient = q - p~ scattered over the vocabulary = [.25 - .625, .25 - .375, .25, .25]
    assert_close(drafter.grad, [[-0.375, -0.125, 0.25, 0.25]])


def test_kl_topk_ignores_minus_inf_padding():
    drafter = torch.tensor([[0.3, -1.2, 2.0, 0.1]])
    ids = torch.tensor([[2, 0]])
    logp = torch.tensor([[LN(0.6), LN(0.2)]])
    base, _ = kl_distillation(drafter, ids, logp)
    padded, _ = kl_distillation(drafter, torch.tensor([[2, 0, 0]]), torch.tensor([[LN(0.6), LN(0.2), -math.inf]]))
    assert torch.isfinite(padded)
    assert padded.item() == pytest.approx(base.item(), abs=1e-7)


def test_kl_weights_average_positions():
    drafter = torch.zeros(2, 2, requires_grad=True)
    ids = torch.tensor([[0, 1], [0, 1]])
    logp = torch.tensor([[LN(0.75), LN(0.25)], [LN(0.5), LN(0.5)]])  # KL row 0 = 0.130812, row 1 = 0
    loss, _ = kl_distillation(drafter, ids, logp)
    assert loss.item() == pytest.approx(0.130812 / 2, abs=1e-6)  # plain mean
    loss, _ = kl_distillation(drafter, ids, logp, weights=torch.tensor([3.0, 1.0]))
    assert loss.item() == pytest.approx(3 * 0.130812 / 4, abs=1e-6)  # (3 * kl0 + 1 * 0) / 4
    loss, _ = kl_distillation(drafter, ids, logp, weights=torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0 and drafter.grad.abs().sum().item() == 0.0


def test_kl_rejects_bad_input():
    drafter = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="temperature"):
        kl_distillation(drafter, torch.tensor([[0]]), torch.tensor([[0.0]]), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        kl_distillation(drafter, torch.tensor([[3]]), torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="must match"):
        kl_distillation(drafter, torch.tensor([[0, 1]]), torch.tensor([[0.0]]))


# ----------------------------------------------------------------------------- CE
def test_reward_masked_ce_hand_computed_and_ignores_rejected():
    drafter = logits_of([0.25, 0.75], [0.5, 0.5], [0.2, 0.8])
    target = torch.tensor([1, 0, 0])
    reward = torch.tensor([True, False, True])
    loss, stats = reward_masked_ce(drafter, target, reward)
    # -(ln 0.75 + ln 0.2) / 2 = (0.287682 + 1.609438) / 2 = 0.948560
    assert loss.item() == pytest.approx(0.948560, abs=1e-6)
    assert stats["num_accepted"] == 2.0
    loss.backward()
    assert drafter.grad[1].abs().sum().item() == 0.0  # the rejected row gets no gradient
    # row 0: -(1/2) (onehot(1) - q) = -(1/2) [-0.25, 0.25]
    assert drafter.grad[0].tolist() == pytest.approx([0.125, -0.125], abs=1e-6)
    # a different target or logits at the rejected row change nothing
    other = logits_of([0.25, 0.75], [0.01, 0.99], [0.2, 0.8])
    same, _ = reward_masked_ce(other, torch.tensor([1, 1, 0]), reward)
    assert same.item() == pytest.approx(loss.item(), abs=1e-7)


def test_reward_masked_ce_no_accepted_is_zero_with_grad():
    drafter = logits_of([0.5, 0.5], [0.1, 0.9])
    loss, stats = reward_masked_ce(drafter, torch.tensor([0, 0]), torch.tensor([False, False]))
    loss.backward()
    assert loss.item() == 0.0 and stats["num_accepted"] == 0.0
    assert drafter.grad is not None and drafter.grad.abs().sum().item() == 0.0


def test_reward_masked_ce_float_reward_divides_by_at_least_one():
    drafter = logits_of([0.25, 0.75])
    loss, _ = reward_masked_ce(drafter, torch.tensor([1]), torch.tensor([0.5]))
    # -0.5 ln 0.75 / max(0.5, 1) = 0.5 * 0.287682 = 0.143841
    assert loss.item() == pytest.approx(0.143841, abs=1e-6)


# ----------------------------------------------------------------------------- PG
def test_policy_gradient_hand_computed_loss_and_gradient():
    drafter = logits_of([0.25, 0.75], [0.5, 0.5])
    token = torch.tensor([1, 0])
    reward = torch.tensor([True, False])
    loss, stats = policy_gradient(drafter, token, reward, baseline=0.25)
    # advantages: [1 - .25, 0 - .25] = [0.75, -0.25]
    # pg = -(0.75 ln 0.75 - 0.25 ln 0.5) / 2 = -(-0.215762 + 0.173287) / 2 = 0.021237
    assert loss.item() == pytest.approx(0.021237, abs=1e-6)
    assert stats["advantage_mean"] == pytest.approx(0.25)  # (0.75 - 0.25) / 2
    assert stats["logq_mean"] == pytest.approx((LN(0.75) + LN(0.5)) / 2, abs=1e-6)
    assert stats["num_valid"] == 2.0
    loss.backward()
    # grad row i = -(adv_i / 2) (onehot(token_i) - q_i)
    # row 0: -(0.375) [-0.25, 0.25] = [0.09375, -0.09375]; row 1: (0.125) [0.5, -0.5] = [0.0625, -0.0625]
    assert_close(drafter.grad, [[0.09375, -0.09375], [0.0625, -0.0625]])


def test_policy_gradient_sgd_step_raises_accepted_and_lowers_rejected():
    torch.manual_seed(2)
    logits = torch.randn(6, 5, requires_grad=True)
    token = torch.tensor([0, 3, 1, 4, 2, 2])
    reward = torch.tensor([True, True, False, True, False, True])
    before = gather_logprobs(logits.detach(), token)
    loss, _ = policy_gradient(logits, token, reward, baseline=0.6)
    loss.backward()
    with torch.no_grad():
        after = gather_logprobs(logits - 0.1 * logits.grad, token)
    up = after > before
    assert up.tolist() == reward.tolist()  # accepted: log q up; rejected: log q down


def test_policy_gradient_importance_weight_and_valid_mask():
    drafter = logits_of([0.25, 0.75], [0.5, 0.5], [0.9, 0.1])
    token = torch.tensor([1, 0, 0])
    reward = torch.tensor([1.0, 0.0, 1.0])
    w = torch.tensor([2.0, 1.0, 0.5], requires_grad=True)
    valid = torch.tensor([True, True, False])
    loss, stats = policy_gradient(drafter, token, reward, 0.5, importance_weight=w, valid=valid)
    # rows 0, 1 valid: -(2 * 0.5 * ln 0.75 + 1 * (-0.5) * ln 0.5) / 2
    #   = -(-0.287682 + 0.346574) / 2 = -0.029446
    assert loss.item() == pytest.approx(-0.029446, abs=1e-6)
    assert stats["importance_weight_mean"] == pytest.approx(1.5)
    assert stats["num_valid"] == 2.0
    loss.backward()
    assert drafter.grad[2].abs().sum().item() == 0.0  # the invalid row gets nothing
    assert w.grad is None  # importance weights are constants


def test_policy_gradient_tensor_baseline_per_token():
    drafter = logits_of([0.5, 0.5], [0.5, 0.5])
    loss, _ = policy_gradient(drafter, torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    # advantages [0, 1]: -(0 + 1 * ln 0.5) / 2 = 0.346574
    assert loss.item() == pytest.approx(0.346574, abs=1e-6)


# ----------------------------------------------------------------------------- entropy
def test_entropy_bonus_hand_computed():
    drafter = logits_of([0.25, 0.25, 0.25, 0.25], [0.25, 0.75, 1e-30, 1e-30], [0.7, 0.1, 0.1, 0.1])
    ent, stats = entropy_bonus(drafter, valid=torch.tensor([True, True, False]))
    # row 0: ln 4 = 1.386294
    # row 1 (its 1e-30 entries add ~1e-28): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    # mean over the two valid rows = (1.386294 + 0.562335) / 2 = 0.974315
    assert ent.item() == pytest.approx(0.974315, abs=1e-5)
    assert stats["entropy"] == pytest.approx(ent.item())
    ent.backward()
    assert torch.isfinite(drafter.grad).all()


def test_entropy_bonus_handles_minus_inf_logits():
    drafter = torch.tensor([[0.0, 0.0, -math.inf]], requires_grad=True)
    ent, _ = entropy_bonus(drafter)
    ent.backward()
    assert ent.item() == pytest.approx(LN(2.0))
    assert torch.isfinite(drafter.grad).all()


# ----------------------------------------------------------------------------- baseline
def test_ema_update_and_baseline_state_roundtrip():
    assert ema_update(None, 0.6, 0.9) == 0.6  # first batch sets the baseline
    assert ema_update(0.6, 1.0, 0.9) == pytest.approx(0.64)  # 0.9 * 0.6 + 0.1 * 1.0
    with pytest.raises(ValueError, match="1.0"):
        ema_update(0.5, 0.5, 1.0)

    b = EmaBaseline(decay=0.75)
    assert b.current(0.3) == 0.3  # before any update: the batch's own mean
    assert b.update(0.2) == 0.2
    assert b.update(1.0) == pytest.approx(0.4)  # 0.75 * 0.2 + 0.25 * 1.0
    assert b.current(0.0) == pytest.approx(0.4)
    restored = EmaBaseline(decay=0.9)
    restored.load_state_dict(b.state_dict())
    assert restored.state_dict() == {"decay": 0.75, "value": pytest.approx(0.4), "num_updates": 2}
    assert restored.update(0.0) == b.update(0.0) == pytest.approx(0.3)  # 0.75 * 0.4 + 0.25 * 0
    with pytest.raises(ValueError, match="nan"):
        b.update(float("nan"))


# ----------------------------------------------------------------------------- combined
def _batch():
    drafter = logits_of([0.25, 0.5, 0.25], [0.2, 0.2, 0.6], [0.5, 0.25, 0.25])
    return dict(
        drafter_logits=drafter,
        token=torch.tensor([1, 2, 0]),
        target_token=torch.tensor([1, 2, 1]),
        reward=torch.tensor([True, True, False]),
        verifier_topk_ids=torch.tensor([[1, 0], [2, 1], [1, 2]]),
        verifier_topk_logprobs=torch.tensor([[LN(0.7), LN(0.2)], [LN(0.9), LN(0.05)], [LN(0.6), LN(0.3)]]),
    )


def test_combined_loss_is_the_weighted_sum_of_terms():
    b = _batch()
    logits = b["drafter_logits"]
    w = ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.1)
    total, stats = combined_loss(**b, weights=w, baseline=0.4)
    kl, _ = kl_distillation(logits, b["verifier_topk_ids"], b["verifier_topk_logprobs"])
    ce, _ = reward_masked_ce(logits, b["target_token"], b["reward"])
    pg, _ = policy_gradient(logits, b["token"], b["reward"], 0.4)
    ent, _ = entropy_bonus(logits)
    expected = 0.05 * kl + 1.0 * ce + 1.0 * pg - 0.1 * ent
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert stats["kl"] == pytest.approx(kl.item()) and stats["ce"] == pytest.approx(ce.item())
    assert stats["pg"] == pytest.approx(pg.item()) and stats["entropy"] == pytest.approx(ent.item())
    assert stats["reward_mean"] == pytest.approx(2 / 3) and stats["baseline"] == 0.4
    lambdas = (stats["lambda_kl"], stats["lambda_ce"], stats["lambda_pg"], stats["entropy_coef"])
    assert lambdas == (0.05, 1.0, 1.0, 0.1)
    assert all(isinstance(v, float) for v in stats.values())


def test_combined_loss_kl_phase_gradient_is_the_kl_gradient():
    b = _batch()
    logits = b["drafter_logits"]
    total, _ = combined_loss(**b, weights=ScheduleWeights("kl", 1.0, 0.0, 0.0, 0.0), baseline=0.5, kl_temperature=2.0)
    (g_total,) = torch.autograd.grad(total, logits)
    kl, _ = kl_distillation(logits, b["verifier_topk_ids"], b["verifier_topk_logprobs"], 2.0)
    (g_kl,) = torch.autograd.grad(kl, logits)
    assert torch.allclose(g_total, g_kl, atol=1e-7)


def test_combined_loss_valid_mask_silences_a_row_in_every_term():
    b = _batch()
    valid = torch.tensor([True, False, True])
    total, stats = combined_loss(**b, weights=ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.1), baseline=0.4, valid=valid)
    total.backward()
    assert b["drafter_logits"].grad[1].abs().sum().item() == 0.0
    assert b["drafter_logits"].grad[0].abs().sum().item() > 0.0
    assert stats["num_accepted"] == 1.0 and stats["reward_mean"] == pytest.approx(0.5)


def test_losses_on_an_empty_batch_are_zero_and_differentiable():
    logits = torch.zeros(0, 5, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    total, stats = combined_loss(
        logits,
        token=empty,
        target_token=empty,
        reward=torch.zeros(0, dtype=torch.bool),
        verifier_topk_ids=torch.zeros(0, 2, dtype=torch.int64),
        verifier_topk_logprobs=torch.zeros(0, 2),
        weights=ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.1),
        baseline=0.5,
    )
    total.backward()
    assert total.item() == 0.0 and logits.grad.shape == (0, 5)
    assert stats["kl"] == 0.0 and stats["pg"] == 0.0
