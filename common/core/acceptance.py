"""Deciding which drafted tokens the verifier accepts (pure functions, no model).

Words (accepted, recovered, bonus) as common/core/vocabulary.py defines them, which follows
vLLM's rejection sampler and Leviathan et al. 2023 ("Fast Inference from Transformers via
Speculative Decoding"). Each block commits `n_accepted + 1` tokens: the accepted prefix plus one recovered or bonus token.
Greedy acceptance reproduces greedy decoding token for token; rejection sampling reproduces the
target distribution p exactly, whatever the proposal q.
"""

from __future__ import annotations

import torch


def greedy_accept(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of the draft equal to the verifier's argmax, plus the verifier's next token.

    draft_tokens: [G] int64; target_logits: [G + 1, V] (row i scores the token after draft i-1).
    Returns (n_accepted in [0, G], next_token).
    """
    g = draft_tokens.shape[0]
    assert target_logits.shape[0] == g + 1, f"need G+1={g + 1} target rows, got {target_logits.shape[0]}"
    target_tokens = target_logits.argmax(dim=-1)  # [G + 1]; ties go to the lowest id, as in HF generate
    matches = (draft_tokens == target_tokens[:g]).to(torch.int64)
    n_accepted = int(matches.cumprod(0).sum().item()) if g else 0
    return n_accepted, int(target_tokens[n_accepted].item())


def rejection_accept(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling: the committed tokens are distributed exactly as p.

    draft_tokens: [G] int64 sampled from draft_probs; draft_probs: [G, V] q; target_probs:
    [G + 1, V] p (both already warped by temperature/top-k/top-p). Accept draft i with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection, sample the recovered token from
    normalise(max(0, p_i - q_i)); if all G are accepted, sample the bonus token from p_G.
    Returns (n_accepted, next_token).
    """
    g = draft_tokens.shape[0]
    assert target_probs.shape[0] == g + 1 and draft_probs.shape[0] == g
    uniforms = torch.rand(g, generator=generator, dtype=torch.float64)  # one draw per draft, in order
    for i in range(g):
        token = int(draft_tokens[i])
        p = float(target_probs[i, token])
        q = float(draft_probs[i, token])
        # q > 0 because the token was sampled from q; accept when u < p / q
        if uniforms[i].item() * q < p:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any p-sample is exact
            residual = target_probs[i]
        return i, int(torch.multinomial(residual, 1, generator=generator).item())
    return g, int(torch.multinomial(target_probs[g], 1, generator=generator).item())
