"""Frozen, validated configuration of the learner: the KL->RL schedule and the optimiser/replay knobs.

Defaults follow the paper's reference code (github.com/shrenikbhansali/DVI, d34e3b3): 40 KL-only steps, an 80-step
linear ramp to lambda_pg = 1 and lambda_kl = 0.05; AdamW with head lr 5e-4 (weight decay 1e-2) and
LoRA lr 5e-5; grad clip 1.0; batches of 64 drafted tokens; a FIFO replay of 4096 tokens.

Learning-rate groups. Every trainable tensor of our drafter sits in the exit head, after h_k
(trap 2 of the reference code: nothing before h_k is trained). The head has two parts:
  * the LoRA on the shared LM head (parameter names contain `head_param_pattern`, "lm_head")
    plays the role of the reference's trained output head: `head_lr`, `head_weight_decay`;
  * the exit layer (every other trainable name): its private copy trained at full rank by default
    (DrafterConfig.full_rank_exit_layer), or its LoRA: `lora_lr`, `lora_weight_decay` (the name
    is the reference's, whose exit layer was a LoRA).
Set `lora_lr == head_lr` (and equal decays) for a single group. The rates are the ones measured
best on SmolLM2-135M (README, "Improve: warm start and held-out agreement"); the service
(`dvi run`, `dvi demo`), `dvi train-local` and `dvi warmstart` all use them by default.

Every field carries one doc line; `__post_init__` raises `ValueError` naming the bad value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable
from common.core.config import require

SCHEDULE_KINDS = ("kl-rl", "kl-only", "rl-only")
STALENESS_POLICIES = ("drop", "importance")




@dataclass(frozen=True)
class ScheduleConfig:
    """Which losses the learner mixes at each optimiser step (see `learner.schedule`)."""

    kind: str = "kl-rl"
    """kl-rl: KL only, then a linear ramp to the RL mix; kl-only: KL forever; rl-only: the RL mix from step 0."""
    warmup_steps: int = 40
    """W: optimiser steps of pure KL distillation before the ramp starts (kl-rl only)."""
    ramp_steps: int = 80
    """R: steps of the linear ramp from pure KL to the final mix (kl-rl only; 0 = switch at once)."""
    lambda_kl: float = 0.05
    """Weight of the KL distillation term in the final (RL) mix; it is 1 during warm-up."""
    lambda_ce: float = 1.0
    """Weight of the reward-masked cross-entropy in the final mix; it enters with the RL mix."""
    lambda_pg: float = 1.0
    """Weight of the policy-gradient term in the final mix."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient in the final mix (the loss subtracts coef * mean entropy)."""

    def __post_init__(self) -> None:
        require(self.kind in SCHEDULE_KINDS, f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.ramp_steps >= 0, f"ramp_steps must be >= 0, got {self.ramp_steps}")
        for name in ("lambda_kl", "lambda_ce", "lambda_pg", "entropy_coef"):
            value = getattr(self, name)
            require(value >= 0.0, f"{name} must be >= 0, got {value}")
        require(
            self.kind == "kl-only" or self.lambda_kl + self.lambda_ce + self.lambda_pg > 0.0,
            f"the final mix is all zero (lambda_kl={self.lambda_kl}, lambda_ce={self.lambda_ce}, "
            f"lambda_pg={self.lambda_pg}): nothing would be trained",
        )


@dataclass(frozen=True)
class LearnerConfig:
    """Optimiser, batching, replay and staleness settings of the online learner."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The KL->RL loss schedule."""
    head_lr: float = 3e-3
    """AdamW lr of the LoRA on the LM head (names containing `head_param_pattern`); the reference's 5e-4 learned
    ~2x slower on SmolLM2 (train-local, exit layer 8), 3e-3 is what train-local and the warm start measured best."""
    head_weight_decay: float = 1e-2
    """AdamW weight decay of the LM-head LoRA group (the reference's head decay)."""
    lora_lr: float = 1e-3
    """AdamW lr of every other trainable tensor (the exit layer: its full-rank copy, or its LoRA); 1e-3 beat
    3e-4 and 1e-4 on SmolLM2's held-out agreement (README, "Improve: warm start and held-out agreement")."""
    fine_tune_lr: float | None = 1e-4
    """AdamW lr of every trainable tensor when the drafter starts from trained weights (a warm start or a
    saved adapter: `SplitModel.starts_trained`); None keeps head_lr / lora_lr there too. The rates above
    were measured for an untrained head: from the shipped warm start, 12 requests at them lowered held-out
    agreement from 25.9% to 23.1%, at 3e-4 to 25.1%, at 1e-4 it rose to 26.1% (README, issue 13's headline run)."""
    lora_weight_decay: float = 0.0
    """AdamW weight decay of the exit-adapter LoRA group."""
    head_param_pattern: str = "lm_head"
    """Substring of a parameter name that puts it in the head group."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    batch_tokens: int = 64
    """Drafted tokens per optimiser step (whole trajectories are sampled until at least this many)."""
    replay_capacity_tokens: int = 4096
    """Capacity of the FIFO replay buffer, in drafted tokens."""
    kl_temperature: float = 1.0
    """Distillation temperature T applied to both distributions; the KL is multiplied by T^2."""
    baseline_ema: float = 0.9
    """Decay of the EMA reward baseline b (b <- decay * b + (1 - decay) * batch mean reward)."""
    max_staleness: int = 4
    """Oldest usable trajectory: weight_version >= current_version - max_staleness."""
    staleness_policy: str = "drop"
    """drop: discard trajectories older than max_staleness; importance: keep them, reweight the PG term."""
    importance_clip: float = 2.0
    """Upper clip of the importance ratio q_current / q_behaviour used by the PG term."""
    seed: int = 0
    """Seed of the learner's replay sampling generator."""

    def __post_init__(self) -> None:
        require(isinstance(self.schedule, ScheduleConfig), f"schedule must be a ScheduleConfig, got {self.schedule!r}")
        for name in ("head_lr", "lora_lr", "kl_temperature", "importance_clip"):
            value = getattr(self, name)
            require(value > 0.0, f"{name} must be > 0, got {value}")
        require(self.fine_tune_lr is None or self.fine_tune_lr > 0.0,
                f"fine_tune_lr must be > 0 or None, got {self.fine_tune_lr}")
        for name in ("head_weight_decay", "lora_weight_decay", "grad_clip"):
            value = getattr(self, name)
            require(value >= 0.0, f"{name} must be >= 0, got {value}")
        require(bool(self.head_param_pattern), "head_param_pattern must be a non-empty string")
        require(self.batch_tokens >= 1, f"batch_tokens must be >= 1, got {self.batch_tokens}")
        require(
            self.replay_capacity_tokens >= self.batch_tokens,
            f"replay_capacity_tokens ({self.replay_capacity_tokens}) must be >= batch_tokens ({self.batch_tokens})",
        )
        require(0.0 <= self.baseline_ema < 1.0, f"baseline_ema must be in [0, 1), got {self.baseline_ema}")
        require(self.max_staleness >= 0, f"max_staleness must be >= 0, got {self.max_staleness}")
        require(
            self.staleness_policy in STALENESS_POLICIES,
            f"staleness_policy must be one of {STALENESS_POLICIES}, got {self.staleness_policy!r}",
        )

    def param_groups(self, named_parameters: Iterable[tuple[str, Any]], fine_tune: bool = False) -> list[dict[str, Any]]:
        """AdamW parameter groups for `named_parameters` (name, parameter) pairs.

        Returns up to two groups, head first, each {"name", "params", "lr", "weight_decay"};
        an empty group is left out. Parameters with requires_grad False are skipped. With
        `fine_tune` (the drafter starts from trained weights) both groups take `fine_tune_lr`
        when it is set.
        """
        head: list[Any] = []
        rest: list[Any] = []
        for name, param in named_parameters:
            if not getattr(param, "requires_grad", True):
                continue
            (head if self.head_param_pattern in name else rest).append(param)
        tuned = fine_tune and self.fine_tune_lr is not None
        groups = [
            {"name": "head", "params": head, "lr": self.fine_tune_lr if tuned else self.head_lr,
             "weight_decay": self.head_weight_decay},
            {"name": "lora", "params": rest, "lr": self.fine_tune_lr if tuned else self.lora_lr,
             "weight_decay": self.lora_weight_decay},
        ]
        return [g for g in groups if g["params"]]
