"""The drafter's reduced vocabulary, learned from traffic (pure functions, shared by the actors
that draft with it and the learner that picks it).

A drafter that proposes from V' << V tokens runs an LM head V / V' times smaller per drafted
token (EAGLE-3's reduced draft vocabulary; on SmolLM2-135M the full 49k-row head is a fifth of a
forward pass). The verifier keeps the full vocabulary, so decoding stays lossless; a verifier
token outside the draft vocabulary is simply never drafted.

Which V' tokens: the most frequent ones in the traffic the learner has seen (prompts and
committed tokens alike, counted from `Trajectory.tokens`), ties and unseen tokens ordered by id
(BPE vocabularies number their merges roughly by frequency, so the lowest ids are the best prior
before any traffic), with the EOS ids always in.

The learner trains the drafter in the same space the actors draft in: logits restricted to the
draft vocabulary, and every target id mapped to its index there (`draft_index`); ids outside it
become -1 and drop out of the losses.
"""

from __future__ import annotations

import torch


def select_draft_vocab(
    counts: torch.Tensor, size: int, always: set[int] | frozenset[int] = frozenset(), prefer: torch.Tensor | None = None
) -> torch.Tensor:
    """The `size` ids with the highest `counts` [V] (ties: ids in `prefer` first, then lower id
    first), `always` ids forced in (replacing the lowest-ranked others). Returns [size] int64 ids,
    ascending. `prefer` (e.g. the current vocabulary, a warm start's) keeps a vocabulary in place
    where traffic has not said otherwise, so a few requests cannot displace it."""
    vocab = counts.shape[0]
    if not 1 <= size <= vocab:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab}], got {size}")
    forced = sorted(i for i in always if 0 <= i < vocab)[:size]
    score = 2.0 * counts.to(torch.float64)
    if prefer is not None:
        score[prefer.to(torch.int64).cpu()] += 1.0  # counts are integers: this only breaks ties
    # stable sort on -score keeps id order among equal scores
    ranked = torch.sort(-score, stable=True).indices
    keep = ranked[~torch.isin(ranked, torch.tensor(forced, dtype=torch.int64))][: size - len(forced)]
    return torch.sort(torch.cat([keep, torch.tensor(forced, dtype=torch.int64)])).values


def checked_draft_vocab(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`ids` as a sorted int64 CPU tensor; ValueError unless 1-D, non-empty, distinct and in [0, V)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("a draft vocabulary must be a non-empty 1-D tensor of token ids")
    if ids.dtype != torch.int64:
        raise ValueError(f"draft vocabulary ids must be int64, got {ids.dtype}")
    ids = ids.detach().cpu()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft vocabulary ids must lie in [0, {vocab_size})")
    ids = torch.sort(ids).values
    if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
        raise ValueError("draft vocabulary ids must be distinct")
    return ids


def draft_index(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] int64 lookup: entry t is the index of token t in `vocab` ([V'] ids), or -1."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.int64, device=vocab.device)
    lookup[vocab] = torch.arange(vocab.shape[0], device=vocab.device)
    return lookup


def count_tokens(counts: torch.Tensor, tokens: torch.Tensor) -> None:
    """Add the occurrences of `tokens` [n] int64 to `counts` [V] int64 in place."""
    counts.index_add_(0, tokens.to(counts.device), torch.ones_like(tokens, dtype=counts.dtype, device=counts.device))


def restrict_topk(ids: torch.Tensor, logprobs: torch.Tensor, lookup: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifier top-K rows ([R, K] ids and log-probs) in draft-vocabulary space: ids mapped through
    `lookup`; entries outside the vocabulary get index 0 and log-prob -inf (probability 0, which
    the KL ignores). A row left with no entry keeps probability 0 everywhere (the KL's caller
    must weight it 0: see `has_mass`)."""
    mapped = lookup[ids]
    inside = mapped >= 0
    return mapped.clamp_min(0), torch.where(inside, logprobs, torch.full_like(logprobs, float("-inf")))


def has_mass(logprobs: torch.Tensor) -> torch.Tensor:
    """[R] bool: rows with at least one finite log-prob."""
    return torch.isfinite(logprobs).any(dim=-1)
