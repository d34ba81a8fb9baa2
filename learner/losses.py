"""The learner's losses: pure functions of the drafter's logits and the recorded trajectory fields.

Draft, Verify, and Improve (arXiv 2510.05421) trains the drafter q from every verification:
  * KL distillation   KL(p || q) toward the frozen verifier p at every drafted position;
  * reward-masked CE  -sum_i r_i log q(target_i) / max(sum_i r_i, 1): imitate the verifier's
                      token only where the drafter was accepted (trap 6 of the reference code:
                      rejected draft tokens are never CE targets);
  * policy gradient   REINFORCE with an EMA baseline b: -mean_i w_i (r_i - b) log q(token_i),
                      w_i an optional (detached) importance weight for stale trajectories;
  * entropy bonus     mean_i H(q_i), subtracted from the loss with a coefficient.
`combined_loss` mixes them with the weights of `learner.schedule`.

Inputs: `drafter_logits` [N, V] float (float32 recommended; the reference code saw NaNs in fp16)
with grad, one row per recorded drafted token, and the matching flat fields of a `TrainBatch`.
Every loss returns `(loss, stats)`: a scalar tensor with grad and a dict of detached floats.
An empty batch (N == 0, or nothing selected) gives a zero loss that still has a grad (of zeros).

The states behind KL and CE do not depend on the drafter's weights (the verifier commits the same
tokens whatever the drafter proposes; lossless decoding), so those terms need no off-policy
correction; only the policy gradient, whose actions are the drafter's own samples, does.
"""

from __future__ import annotations

import math

import torch

from learner.schedule import ScheduleWeights

__all__ = [
    "masked_mean",
    "weighted_mean",
    "gather_logprobs",
    "kl_distillation",
    "reward_masked_ce",
    "policy_gradient",
    "entropy_bonus",
    "ema_update",
    "EmaBaseline",
    "combined_loss",
]


# ----------------------------------------------------------------------------- helpers
def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `x` [N] over the positions where `mask` [N] bool is True (all when None).

    Returns a scalar; 0 (with a defined, zero grad) when no position is selected.
    """
    if mask is None:
        return x.sum() / max(x.numel(), 1)
    assert mask.shape == x.shape, f"mask {tuple(mask.shape)} vs x {tuple(x.shape)}"
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def weighted_mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum(w * x) / sum(w) for `x`, `weights` [N] (w >= 0, detached); plain mean when None.

    Returns a scalar; 0 (with a defined, zero grad) when sum(w) == 0.
    """
    if weights is None:
        return masked_mean(x)
    assert weights.shape == x.shape, f"weights {tuple(weights.shape)} vs x {tuple(x.shape)}"
    w = weights.detach().to(x.dtype)
    total = w.sum()
    return (w * x).sum() / torch.where(total > 0, total, torch.ones_like(total))


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over the full vocabulary, gathered at `ids`.

    logits: [N, V] float; ids: [N] or [N, K] int64. Returns float32 of ids' shape.
    """
    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    if ids.dim() == 1:
        return logq.gather(-1, ids[:, None]).squeeze(-1)
    return logq.gather(-1, ids)


def _check_logits(drafter_logits: torch.Tensor) -> tuple[int, int]:
    if drafter_logits.dim() != 2 or not drafter_logits.is_floating_point():
        raise ValueError(f"drafter_logits must be a float [N, V] tensor, got {tuple(drafter_logits.shape)} "
                         f"{drafter_logits.dtype}")
    return int(drafter_logits.shape[0]), int(drafter_logits.shape[1])


def _check_rows(name: str, t: torch.Tensor, n: int) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be [N={n}], got {tuple(t.shape)}")


def _check_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    if ids.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")


# ----------------------------------------------------------------------------- losses
def kl_distillation(
    drafter_logits: torch.Tensor,  # [N, V] float, with grad
    verifier_topk_ids: torch.Tensor,  # [N, K] int64
    verifier_topk_logprobs: torch.Tensor,  # [N, K] float32, log-softmax at temperature 1
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,  # [N] float >= 0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward KL(p_verifier || q_drafter) per position, averaged over positions (weighted if given).

    With S the recorded id set of a row (K ids) and T the temperature:
      p~_i  = softmax_S(verifier_topk_logprobs / T)_i      the verifier renormalised over S
      log q_i = log_softmax(drafter_logits / T)_i          the drafter over the FULL vocabulary
      kl     = T^2 * sum_{i in S} p~_i (log p~_i - log q_i)
    K == V (S is the whole vocabulary): p~ is exactly softmax(log p / T) = p at temperature T
    (log p differs from the logits by a constant), so this is the exact KL.
    K < V: p~ is the verifier truncated to its top-K and renormalised (its tail mass, reported as
    `verifier_topk_mass`, is dropped), while q is NOT renormalised over S:
      kl = KL(p~ || q_S) - log q(S) >= 0,   q_S = q renormalised over S,
    so the term also pushes the drafter's mass into S, and its gradient in the logits,
    T * (q - p~ scattered over the vocabulary), is the exact gradient of the cross-entropy toward
    p~. Entries with p~ = 0 (e.g. -inf padding from `collate`) contribute nothing.
    The T^2 factor (Hinton et al., 2015) keeps the gradient scale independent of T; T = 1 is the
    plain KL.

    Returns (loss, {"kl", "kl_max", "verifier_topk_mass", "drafter_topk_mass", "top1_agreement"}).
    """
    n, vocab = _check_logits(drafter_logits)
    if verifier_topk_ids.dim() != 2 or verifier_topk_ids.shape[0] != n:
        raise ValueError(f"verifier_topk_ids must be [N={n}, K], got {tuple(verifier_topk_ids.shape)}")
    if verifier_topk_logprobs.shape != verifier_topk_ids.shape:
        raise ValueError(f"verifier_topk_logprobs {tuple(verifier_topk_logprobs.shape)} must match "
                         f"verifier_topk_ids {tuple(verifier_topk_ids.shape)}")
    if verifier_topk_ids.shape[1] > vocab:
        raise ValueError(f"K={verifier_topk_ids.shape[1]} exceeds the vocabulary V={vocab}")
    _check_ids("verifier_topk_ids", verifier_topk_ids, vocab)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weights is not None:
        _check_rows("weights", weights, n)

    log_p = torch.log_softmax(verifier_topk_logprobs.detach().float() / temperature, dim=-1)  # [N, K]
    p = log_p.exp()
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))  # 0 * log 0 := 0, no -inf - x
    log_q = gather_logprobs(drafter_logits, verifier_topk_ids, temperature)  # [N, K]
    per_pos = (p * (log_p - log_q)).sum(-1) * temperature**2  # [N]
    loss = weighted_mean(per_pos, weights)

    with torch.no_grad():
        top1 = verifier_topk_ids.gather(-1, verifier_topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
        stats = {
            "kl": float(loss),
            "kl_max": float(per_pos.max()) if n else 0.0,
            "verifier_topk_mass": float(masked_mean(verifier_topk_logprobs.float().exp().sum(-1))),
            "drafter_topk_mass": float(masked_mean(log_q.exp().sum(-1))),
            "top1_agreement": float(masked_mean((drafter_logits.argmax(-1) == top1).float())) if n else 0.0,
        }
    return loss, stats


def reward_masked_ce(
    drafter_logits: torch.Tensor,  # [N, V] float, with grad
    target_token: torch.Tensor,  # [N] int64, the verifier's committed token
    reward: torch.Tensor,  # [N] bool or float in [0, 1]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy toward the verifier's token, weighted by the accept reward:

      ce = -sum_i r_i log q(target_i) / max(sum_i r_i, 1)

    Rejected tokens (r = 0) contribute nothing; with no accepted token the loss is 0 (zero grad).
    Returns (loss, {"ce", "num_accepted"}).
    """
    n, vocab = _check_logits(drafter_logits)
    _check_rows("target_token", target_token, n)
    _check_rows("reward", reward, n)
    _check_ids("target_token", target_token, vocab)
    r = reward.detach().float()
    log_q = gather_logprobs(drafter_logits, target_token)  # [N]
    # the where keeps a -inf log q at a rejected position from turning 0 * -inf into NaN
    terms = torch.where(r > 0, r * log_q, torch.zeros_like(log_q))
    loss = -terms.sum() / r.sum().clamp(min=1.0)
    return loss, {"ce": float(loss.detach()), "num_accepted": float(r.sum())}


def policy_gradient(
    drafter_logits: torch.Tensor,  # [N, V] float, with grad
    token: torch.Tensor,  # [N] int64, the drafted token (the drafter's action)
    reward: torch.Tensor,  # [N] bool or float
    baseline: float | torch.Tensor,  # scalar or [N], detached
    importance_weight: torch.Tensor | None = None,  # [N] float >= 0, detached
    valid: torch.Tensor | None = None,  # [N] bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with a baseline: pg = -mean_{i valid} w_i (r_i - b) log q(token_i).

    `w` (default 1) and `b` are treated as constants. The trajectory record already excludes the
    drafted tokens after a block's first rejection; `valid` masks out any others.
    Its gradient in row i's logits is -(w_i (r_i - b) / n_valid) (onehot(token_i) - q_i): ascent
    on log q(token) where r > b (accepted) and descent where r < b (rejected).
    Returns (loss, {"pg", "advantage_mean", "logq_mean", "importance_weight_mean", "num_valid"}).
    """
    n, vocab = _check_logits(drafter_logits)
    _check_rows("token", token, n)
    _check_rows("reward", reward, n)
    _check_ids("token", token, vocab)
    if valid is not None:
        _check_rows("valid", valid, n)
        valid = valid.bool()
    if importance_weight is not None:
        _check_rows("importance_weight", importance_weight, n)
        w = importance_weight.detach().float()
    else:
        w = torch.ones(n, device=drafter_logits.device)
    b = baseline.detach().float() if isinstance(baseline, torch.Tensor) else torch.tensor(float(baseline))
    advantage = reward.detach().float() - b.to(drafter_logits.device)  # [N]
    log_q = gather_logprobs(drafter_logits, token)  # [N]
    loss = masked_mean(-(w * advantage) * log_q, valid)
    with torch.no_grad():
        stats = {
            "pg": float(loss),
            "advantage_mean": float(masked_mean(advantage, valid)),
            "logq_mean": float(masked_mean(log_q, valid)),
            "importance_weight_mean": float(masked_mean(w, valid)),
            "num_valid": float(n if valid is None else valid.sum()),
        }
    return loss, stats


def entropy_bonus(
    drafter_logits: torch.Tensor,  # [N, V] float, with grad
    valid: torch.Tensor | None = None,  # [N] bool
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean entropy H(q_i) = -sum_v q_iv log q_iv over (valid) positions, in nats.

    The returned tensor is the bonus itself (larger is more spread); a loss adds -coef * it.
    Returns (mean_entropy, {"entropy"}).
    """
    n, _ = _check_logits(drafter_logits)
    if valid is not None:
        _check_rows("valid", valid, n)
        valid = valid.bool()
    logq = torch.log_softmax(drafter_logits.float(), dim=-1)
    q = logq.exp()
    logq = torch.where(q > 0, logq, torch.zeros_like(logq))  # 0 log 0 := 0
    entropy = masked_mean(-(q * logq).sum(-1), valid)
    return entropy, {"entropy": float(entropy.detach())}


# ----------------------------------------------------------------------------- baseline
def ema_update(baseline: float | None, batch_mean_reward: float, decay: float) -> float:
    """b' = decay * b + (1 - decay) * batch_mean_reward; the first batch (b None) sets b' = its mean."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if baseline is None:
        return float(batch_mean_reward)
    return decay * float(baseline) + (1.0 - decay) * float(batch_mean_reward)


class EmaBaseline:
    """The policy gradient's reward baseline: an EMA of batch mean rewards (checkpointable).

    Use `current(batch_mean)` for this step's advantage (the value before this batch; the batch's
    own mean before any update) and then `update(batch_mean)`.
    """

    def __init__(self, decay: float = 0.9, value: float | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.value: float | None = None if value is None else float(value)
        self.num_updates = 0

    def current(self, batch_mean_reward: float) -> float:
        """The baseline to use now: the EMA, or `batch_mean_reward` before the first update."""
        return float(batch_mean_reward) if self.value is None else self.value

    def update(self, batch_mean_reward: float) -> float:
        """Fold one batch's mean reward into the EMA; returns the new value."""
        if not math.isfinite(batch_mean_reward):
            raise ValueError(f"batch_mean_reward must be finite, got {batch_mean_reward}")
        self.value = ema_update(self.value, batch_mean_reward, self.decay)
        self.num_updates += 1
        return self.value

    def state_dict(self) -> dict[str, float | int | None]:
        return {"decay": self.decay, "value": self.value, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        decay = float(state["decay"])
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.value = None if state["value"] is None else float(state["value"])
        self.num_updates = int(state["num_updates"])


# ----------------------------------------------------------------------------- the mix
def _kl_term(drafter_logits, verifier_topk_ids, verifier_topk_logprobs, kl_temperature: float,
             kl_w: torch.Tensor | None, extra_kl) -> tuple[torch.Tensor, dict[str, float]]:
    """The KL distillation term over the drafted rows (weighted by `kl_w`, None: all 1) and the
    `extra_kl` rows (weight 1 each), as `combined_loss` documents."""
    if extra_kl is None or not extra_kl[0].shape[0]:
        return kl_distillation(drafter_logits, verifier_topk_ids, verifier_topk_logprobs, kl_temperature, kl_w)
    extra_logits, extra_ids, extra_logprobs = extra_kl
    n = drafter_logits.shape[0]
    ones = torch.ones(extra_logits.shape[0], device=drafter_logits.device)
    return kl_distillation(
        torch.cat([drafter_logits, extra_logits]),
        torch.cat([verifier_topk_ids, extra_ids]),
        torch.cat([verifier_topk_logprobs, extra_logprobs]),
        kl_temperature,
        torch.cat([kl_w if kl_w is not None else torch.ones(n, device=ones.device), ones]),
    )


def combined_loss(
    drafter_logits: torch.Tensor,  # [N, V] float, with grad
    *,
    token: torch.Tensor,  # [N] int64
    target_token: torch.Tensor,  # [N] int64
    reward: torch.Tensor,  # [N] bool or float
    verifier_topk_ids: torch.Tensor,  # [N, K] int64
    verifier_topk_logprobs: torch.Tensor,  # [N, K] float32
    weights: ScheduleWeights,
    baseline: float,
    kl_temperature: float = 1.0,
    importance_weight: torch.Tensor | None = None,  # [N] float, PG only
    valid: torch.Tensor | None = None,  # [N] bool, applied to every term
    extra_kl: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # [M, V], [M, K], [M, K]
) -> tuple[torch.Tensor, dict[str, float]]:
    """total = l_kl KL + l_ce CE + l_pg PG - entropy_coef H, with the weights of one schedule step.

    Every term is computed (so its stat is logged) even when its weight is 0. Importance weights
    reweight only the policy gradient (see the module docstring). `extra_kl` = (drafter logits,
    verifier top-K ids, log-probs) of M more positions that no token was drafted at: they join the
    KL term only (a distillation target needs no drafter action), each row weighted like a
    valid drafted one.
    Returns (total, stats): "loss", the per-term stats of each function ("kl", "ce", "pg",
    "entropy", ...), "reward_mean", "baseline" and the weights "lambda_kl", "lambda_ce",
    "lambda_pg", "entropy_coef".
    """
    n, _ = _check_logits(drafter_logits)
    _check_rows("reward", reward, n)
    r = reward.detach().float()
    if valid is not None:
        _check_rows("valid", valid, n)
        valid = valid.bool()
        r_used = r * valid.float()
        kl_w = valid.float()
    else:
        r_used, kl_w = r, None

    kl, kl_stats = _kl_term(drafter_logits, verifier_topk_ids, verifier_topk_logprobs, kl_temperature, kl_w, extra_kl)
    ce, ce_stats = reward_masked_ce(drafter_logits, target_token, r_used)
    pg, pg_stats = policy_gradient(drafter_logits, token, r, baseline, importance_weight, valid)
    ent, ent_stats = entropy_bonus(drafter_logits, valid)
    total = weights.lambda_kl * kl + weights.lambda_ce * ce + weights.lambda_pg * pg - weights.entropy * ent

    stats = {"loss": float(total.detach())}
    for part in (kl_stats, ce_stats, pg_stats, ent_stats):
        stats.update(part)
    stats.update(
        reward_mean=float(masked_mean(r, valid)),
        baseline=float(baseline),
        lambda_kl=float(weights.lambda_kl),
        lambda_ce=float(weights.lambda_ce),
        lambda_pg=float(weights.lambda_pg),
        entropy_coef=float(weights.entropy),
    )
    return total, stats
