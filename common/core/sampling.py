"""Turning logits into the distributions that decoding samples from.

`warp` is the single place where temperature, top-k and top-p are applied, so the verifier's
target distribution p and the drafter's proposal q are always built the same way. Randomness is
passed in as a `torch.Generator`, so a seeded run reproduces exactly.
"""

from __future__ import annotations

import torch


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities [..., V] float32 from logits [..., V] at temperature > 0, restricted to the
    top-k tokens (0 = off) and then to the smallest nucleus of mass >= top_p (1.0 = off)."""
    assert temperature > 0, "warp is for sampling; greedy decoding takes the argmax of the logits"
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id drawn from probs [V] (need not be normalised, must have positive mass)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())
