"""Unit tests of learner.schedule (exact boundary values per kind) and learner.config validation."""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig, ScheduleConfig
from learner.schedule import ScheduleWeights, schedule_weights

KL = ScheduleWeights("kl", 1.0, 0.0, 0.0, 0.0)


def approx_weights(w: ScheduleWeights, phase: str, kl: float, ce: float, pg: float, ent: float) -> None:
    assert w.phase == phase
    assert (w.lambda_kl, w.lambda_ce, w.lambda_pg, w.entropy) == pytest.approx((kl, ce, pg, ent), abs=1e-12)


# ----------------------------------------------------------------------------- kl-rl
def test_kl_rl_defaults_at_every_boundary():
    cfg = ScheduleConfig(entropy_coef=0.02)  # W = 40, R = 80, final (kl .05, ce 1, pg 1, ent .02)
    assert schedule_weights(0, cfg) == KL
    assert schedule_weights(39, cfg) == KL  # W - 1: still pure KL
    approx_weights(schedule_weights(40, cfg), "ramp", 1.0, 0.0, 0.0, 0.0)  # W: ramp starts at f = 0
    # W + R/2 = 80: f = 0.5 -> kl = 1 + 0.5 (0.05 - 1) = 0.525; ce = pg = 0.5; ent = 0.01
    approx_weights(schedule_weights(80, cfg), "ramp", 0.525, 0.5, 0.5, 0.01)
    # W + R - 1 = 119: f = 79/80 = 0.9875 -> kl = 1 - 0.9875 * 0.95 = 0.061875
    approx_weights(schedule_weights(119, cfg), "ramp", 0.061875, 0.9875, 0.9875, 0.01975)
    assert schedule_weights(120, cfg) == ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.02)  # W + R: final mix
    assert schedule_weights(10**7, cfg) == ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.02)


def test_kl_rl_custom_mix_and_degenerate_lengths():
    cfg = ScheduleConfig(warmup_steps=2, ramp_steps=4, lambda_kl=0.2, lambda_ce=0.5, lambda_pg=2.0)
    assert schedule_weights(1, cfg) == KL
    # step 3: f = (3 - 2) / 4 = 0.25 -> kl = 1 + 0.25 (0.2 - 1) = 0.8; ce = 0.125; pg = 0.5
    approx_weights(schedule_weights(3, cfg), "ramp", 0.8, 0.125, 0.5, 0.0)
    assert schedule_weights(6, cfg) == ScheduleWeights("rl", 0.2, 0.5, 2.0, 0.0)

    no_ramp = ScheduleConfig(warmup_steps=5, ramp_steps=0)
    assert schedule_weights(4, no_ramp) == KL
    assert schedule_weights(5, no_ramp) == ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.0)  # switch at once

    no_warmup = ScheduleConfig(warmup_steps=0, ramp_steps=10)
    approx_weights(schedule_weights(0, no_warmup), "ramp", 1.0, 0.0, 0.0, 0.0)
    approx_weights(schedule_weights(5, no_warmup), "ramp", 0.525, 0.5, 0.5, 0.0)


# ----------------------------------------------------------------------------- other kinds
@pytest.mark.parametrize("step", [0, 39, 40, 80, 120, 10**7])
def test_kl_only_is_pure_kl_at_every_step(step):
    assert schedule_weights(step, ScheduleConfig(kind="kl-only", entropy_coef=0.3)) == KL


@pytest.mark.parametrize("step", [0, 39, 40, 80, 120, 10**7])
def test_rl_only_is_the_final_mix_at_every_step(step):
    cfg = ScheduleConfig(kind="rl-only", lambda_kl=0.1, entropy_coef=0.3)
    assert schedule_weights(step, cfg) == ScheduleWeights("rl", 0.1, 1.0, 1.0, 0.3)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="-1"):
        schedule_weights(-1, ScheduleConfig())


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "rl-kl"}, "rl-kl"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
        ({"ramp_steps": -3}, "ramp_steps must be >= 0, got -3"),
        ({"lambda_pg": -0.5}, "lambda_pg must be >= 0, got -0.5"),
        ({"entropy_coef": -0.1}, "entropy_coef must be >= 0, got -0.1"),
        ({"lambda_kl": 0.0, "lambda_ce": 0.0, "lambda_pg": 0.0}, "all zero"),
    ],
)
def test_schedule_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_kl_only_may_have_an_all_zero_final_mix():
    cfg = ScheduleConfig(kind="kl-only", lambda_kl=0.0, lambda_ce=0.0, lambda_pg=0.0)
    assert schedule_weights(500, cfg) == KL


def test_a_drafter_that_starts_trained_is_fine_tuned_at_one_lower_rate():
    """From a warm start (or a saved adapter) both groups take fine_tune_lr; from an untrained head
    the measured from-scratch rates; fine_tune_lr None keeps those everywhere."""
    import torch

    named = [("base_model.lm_head.lora_A", torch.zeros(2, requires_grad=True)),
             ("base_model.layers.4.mlp.weight", torch.zeros(2, requires_grad=True))]
    rates = lambda groups: {g["name"]: g["lr"] for g in groups}  # noqa: E731
    cfg = LearnerConfig()
    assert rates(cfg.param_groups(named)) == {"head": 3e-3, "lora": 1e-3}
    assert rates(cfg.param_groups(named, fine_tune=True)) == {"head": 1e-4, "lora": 1e-4}
    plain = LearnerConfig(fine_tune_lr=None)
    assert rates(plain.param_groups(named, fine_tune=True)) == {"head": 3e-3, "lora": 1e-3}


def test_learner_config_defaults_follow_the_reference_but_the_measured_rates():
    cfg = LearnerConfig()
    # the rates measured best on SmolLM2 (README), the rest the reference's
    assert (cfg.head_lr, cfg.head_weight_decay, cfg.lora_lr, cfg.grad_clip) == (3e-3, 1e-2, 1e-3, 1.0)
    assert (cfg.batch_tokens, cfg.replay_capacity_tokens, cfg.max_staleness) == (64, 4096, 4)
    assert (cfg.staleness_policy, cfg.importance_clip, cfg.kl_temperature) == ("drop", 2.0, 1.0)
    assert (cfg.schedule.warmup_steps, cfg.schedule.ramp_steps) == (40, 80)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_lr": 0.0}, "head_lr must be > 0, got 0.0"),
        ({"lora_lr": -1e-4}, "lora_lr must be > 0, got -0.0001"),
        ({"head_weight_decay": -0.1}, "head_weight_decay must be >= 0, got -0.1"),
        ({"grad_clip": -1.0}, "grad_clip must be >= 0, got -1.0"),
        ({"batch_tokens": 0}, "batch_tokens must be >= 1, got 0"),
        ({"replay_capacity_tokens": 32}, r"replay_capacity_tokens \(32\) must be >= batch_tokens \(64\)"),
        ({"kl_temperature": 0.0}, "kl_temperature must be > 0, got 0.0"),
        ({"baseline_ema": 1.0}, r"baseline_ema must be in \[0, 1\), got 1.0"),
        ({"max_staleness": -1}, "max_staleness must be >= 0, got -1"),
        ({"staleness_policy": "keep"}, "'keep'"),
        ({"importance_clip": 0.0}, "importance_clip must be > 0, got 0.0"),
        ({"fine_tune_lr": 0.0}, "fine_tune_lr must be > 0 or None, got 0.0"),
        ({"head_param_pattern": ""}, "head_param_pattern"),
    ],
)
def test_learner_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**kwargs)


def test_learner_config_is_frozen():
    with pytest.raises(AttributeError):
        LearnerConfig().head_lr = 1.0  # type: ignore[misc]


def test_param_groups_split_lm_head_lora_from_the_rest():
    head_a = torch.nn.Parameter(torch.zeros(2))
    layer_a = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    named = [
        ("base_model.model.lm_head.lora_A.default.weight", head_a),
        ("base_model.model.block.self_attn.q_proj.lora_A.default.weight", layer_a),
        ("base_model.model.block.self_attn.q_proj.base_layer.weight", frozen),
    ]
    groups = LearnerConfig().param_groups(named)
    assert [g["name"] for g in groups] == ["head", "lora"]
    assert groups[0]["params"] == [head_a] and (groups[0]["lr"], groups[0]["weight_decay"]) == (3e-3, 1e-2)
    assert groups[1]["params"] == [layer_a] and (groups[1]["lr"], groups[1]["weight_decay"]) == (1e-3, 0.0)
    only_layer = LearnerConfig().param_groups(named[1:])
    assert [g["name"] for g in only_layer] == ["lora"]  # an empty group is left out
    torch.optim.AdamW(groups)  # the groups are valid optimiser input


def test_batch_weights_keep_the_kl_up_on_rows_without_a_drafted_token():
    from learner.schedule import ScheduleWeights, batch_weights

    rl = ScheduleWeights("rl", 0.05, 1.0, 1.0, 0.0)
    # 6 drafted rows of 64: 0.05 * 6/64 + 58/64 = 0.0046875 + 0.90625
    assert batch_weights(rl, 6, 64).lambda_kl == pytest.approx(0.9109375)
    assert batch_weights(rl, 6, 64)[2:] == (1.0, 1.0, 0.0)  # CE, PG and entropy untouched
    assert batch_weights(rl, 64, 64).lambda_kl == pytest.approx(0.05)  # all drafted: the schedule's own weight
    assert batch_weights(rl, 0, 10).lambda_kl == pytest.approx(1.0)  # nothing drafted: pure distillation
    assert batch_weights(rl, 0, 0) == rl
    kl = ScheduleWeights("kl", 1.0, 0.0, 0.0, 0.0)
    assert batch_weights(kl, 3, 9) == kl
    with pytest.raises(ValueError):
        batch_weights(rl, 5, 4)
