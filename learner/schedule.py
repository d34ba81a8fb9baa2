"""The KL->RL loss schedule: which weights the learner gives each loss term at a given step.

Draft, Verify, and Improve (arXiv 2510.05421) first distils the verifier into the drafter (KL),
then moves to an on-policy mix of reward-masked cross-entropy and policy gradient, keeping a little
KL as an anchor. With W = warmup_steps, R = ramp_steps and the final mix (kl*, ce*, pg*, ent*):

  kind     step in [0, W)      step in [W, W + R)                      step >= W + R
  kl-rl    "kl": (1, 0, 0, 0)  "ramp": (1,0,0,0) + f * (final - (1,0,0,0)),  "rl": final
                               f = (step - W) / R
  kl-only  "kl": (1, 0, 0, 0) at every step
  rl-only  "rl": final at every step

The entropy bonus ramps in with the RL terms (it is an RL regulariser) and is 0 in pure KL.

The schedule moves the drafter's *actions* (its drafted tokens) from imitation to reward. Rows of a
batch with no action (positions the verifier scored after a context draft, bonus positions, prompt
positions) have no reward to learn from, so they keep full distillation: `batch_weights` applies
lambda_kl to the drafted rows and 1 to the others. Online, the exit head drafts on a small share
of positions (about 6 drafted rows in a 64-row batch on SmolLM2), so the KL weight stays near 1
instead of dropping to 0.05 and leaving the CE and PG terms to rest on those few rows.
"""

from __future__ import annotations

from typing import NamedTuple

from learner.config import ScheduleConfig


class ScheduleWeights(NamedTuple):
    """Loss weights of one optimiser step.

    phase: "kl" | "ramp" | "rl"; lambda_kl, lambda_ce, lambda_pg: weights of the KL, reward-masked
    CE and policy-gradient terms; entropy: the entropy-bonus coefficient (loss -= entropy * H).
    """

    phase: str
    lambda_kl: float
    lambda_ce: float
    lambda_pg: float
    entropy: float


def _kl_only() -> ScheduleWeights:
    return ScheduleWeights("kl", 1.0, 0.0, 0.0, 0.0)


def _final(cfg: ScheduleConfig) -> ScheduleWeights:
    return ScheduleWeights("rl", cfg.lambda_kl, cfg.lambda_ce, cfg.lambda_pg, cfg.entropy_coef)


def schedule_weights(step: int, cfg: ScheduleConfig) -> ScheduleWeights:
    """Weights of the loss terms at optimiser step `step` (0-based) under `cfg`; see the module table."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.kind == "kl-only":
        return _kl_only()
    if cfg.kind == "rl-only":
        return _final(cfg)
    w, r = cfg.warmup_steps, cfg.ramp_steps
    if step < w:
        return _kl_only()
    if step >= w + r:
        return _final(cfg)
    f = (step - w) / r  # in [0, 1): 0 at the first ramp step, never reaching 1 inside the ramp
    return ScheduleWeights(
        "ramp",
        1.0 + f * (cfg.lambda_kl - 1.0),
        f * cfg.lambda_ce,
        f * cfg.lambda_pg,
        f * cfg.entropy_coef,
    )


def batch_weights(weights: ScheduleWeights, drafted_rows: int, kl_rows: int) -> ScheduleWeights:
    """`weights` with the KL weight of a batch whose KL term averages over `kl_rows` rows, of which
    `drafted_rows` carry a drafted token: lambda_kl on those, 1 on the rest, i.e. on the mean

      lambda_kl' = lambda_kl * s + (1 - s),   s = drafted_rows / kl_rows   (lambda_kl when kl_rows == 0).
    """
    if not 0 <= drafted_rows <= kl_rows:
        raise ValueError(f"need 0 <= drafted_rows <= kl_rows, got {drafted_rows} and {kl_rows}")
    if kl_rows == 0:
        return weights
    share = drafted_rows / kl_rows
    return weights._replace(lambda_kl=weights.lambda_kl * share + (1.0 - share))
