"""Held-out agreement of the exit head with the verifier: how often the drafter's top-1 token is the
verifier's top-1 token, over every scored position of given token sequences.

This is the measure of the drafter's quality that does not depend on the decoding policy: no
confidence stop, no adaptive gamma, no context drafting decides which positions the head is asked
about. At temperature 0 a block of g exit-head drafts is accepted token by token exactly while the
head agrees with the verifier, so agreement a bounds the head's expected accepted run
(a + a^2 + ... + a^g). Learning is measured by it (on held-out prompts), never by training loss.

Contract (both functions are pure: they read the split's current weights and change nothing):
  * a sequence is a list of token ids [T]; position t (0 <= t < T) scores the next token after
    tokens[0..t]: the verifier's top-1 there is argmax p(. | tokens[:t+1]) over the FULL
    vocabulary, the drafter's is argmax q(. | h_k[0..t]) over its draft vocabulary (all V ids,
    or the reduced V' of `SplitModel.draft_vocab`) mapped back to full ids. A verifier top-1
    outside the draft vocabulary counts as a disagreement (the drafter cannot propose it).
  * `start` (default 0) per sequence: only positions t >= start are scored (e.g. the prompt length
    - 1 to score the generated tokens only). Positions are scored whatever the sequence's tokens
    after them are: the targets are the verifier's own argmaxes, not the sequence's next tokens.
  * ties break to the lowest index (torch.argmax), the same on both sides.
`greedy_continuations` makes the sequences to score from prompts: each prompt followed by the
model's own greedy continuation (lossless decoding, context drafting only, so the exit head's
weights cannot change them), with `start` at the last prompt position.
`greedy_targets` gives the same targets for those positions at the cost of the decoding alone.
`verifier_targets` runs the frozen verifier once per sequence (one chunked pass through the
split's own shallow and deep layers); the result can be kept and scored again after every update
of the drafter with `agreement` (the verifier never changes, so its targets never go stale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from common.core.config import DecodeConfig
from common.model.split import SplitModel
from common.decoding.speculative import SpeculativeDecoder


@dataclass(frozen=True)
class AgreementTargets:
    """The verifier's side of one sequence, reusable across drafter updates.

    hidden: [T, H] layer-k states (model dtype) of positions 0..T-1; top1: [T] int64 the verifier's
    argmax next-token id at each position; start: first scored position (0 <= start <= T).
    """

    hidden: torch.Tensor
    top1: torch.Tensor
    start: int

    @property
    def num_scored(self) -> int:
        return int(self.top1.shape[0]) - self.start


@dataclass(frozen=True)
class Agreement:
    """Pooled top-1 agreement: `agreed` of `positions` scored positions (rate 0.0 when none)."""

    agreed: int
    positions: int

    @property
    def rate(self) -> float:
        return self.agreed / self.positions if self.positions else 0.0


def _starts(sequences: Sequence[Sequence[int]], start: int | Sequence[int]) -> list[int]:
    starts = [int(start)] * len(sequences) if isinstance(start, int) else [int(s) for s in start]
    if len(starts) != len(sequences):
        raise ValueError(f"start has {len(starts)} entries for {len(sequences)} sequences")
    for seq, s in zip(sequences, starts):
        if not 0 <= s <= len(seq):
            raise ValueError(f"start {s} is outside [0, {len(seq)}] for a sequence of {len(seq)} tokens")
    return starts


@torch.no_grad()
def verifier_targets(
    split: SplitModel, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 0
) -> list[AgreementTargets]:
    """The verifier's top-1 and the layer-k states at every position of each sequence (see module doc).

    sequences: non-empty lists of token ids in [0, V); start: an int for all, or one per sequence.
    ValueError for an empty sequence, an id out of range or a bad start.
    """
    starts = _starts(sequences, start)
    out = []
    for seq, s in zip(sequences, starts):
        if not seq:
            raise ValueError("agreement needs non-empty sequences")
        ids = torch.tensor([list(seq)], dtype=torch.int64, device=split.device)
        if int(ids.min()) < 0 or int(ids.max()) >= split.vocab_size:
            raise ValueError(f"sequence holds token ids outside [0, {split.vocab_size})")
        pos = torch.arange(ids.shape[1], device=split.device)[None]
        cache = split.new_cache(ids.shape[1])
        hidden = split.shallow(ids, pos, cache)  # [1, T, H]
        logits = split.deep(hidden, pos, cache)  # [1, T, V] float32
        out.append(AgreementTargets(hidden=hidden[0].detach(), top1=logits[0].argmax(-1).cpu(), start=s))
    return out


@torch.no_grad()
def drafter_top1(split: SplitModel, hidden: torch.Tensor) -> torch.Tensor:
    """[T] int64 full-vocabulary ids of the exit head's argmax at every position of hidden [T, H]
    (the draft-vocabulary argmax mapped back through `split.draft_vocab`)."""
    vocab = split.draft_vocab
    logits = split.drafter_logits(hidden, torch.arange(hidden.shape[0]), rows=vocab)  # [T, V']
    return vocab[logits.argmax(-1)].cpu()


def agreement(split: SplitModel, targets: Sequence[AgreementTargets]) -> Agreement:
    """Pooled top-1 agreement of the split's current exit head with precomputed verifier targets."""
    was_training = split.exit_head.training
    split.exit_head.eval()  # no dropout while measuring
    try:
        agreed = positions = 0
        for t in targets:
            if t.num_scored <= 0:
                continue
            mine = drafter_top1(split, t.hidden[: t.top1.shape[0]])
            agreed += int((mine[t.start :] == t.top1[t.start :]).sum())
            positions += t.num_scored
    finally:
        split.exit_head.train(was_training)
    return Agreement(agreed=agreed, positions=positions)


def exit_head_agreement(
    split: SplitModel, sequences: Sequence[Sequence[int]], start: int | Sequence[int] = 0
) -> Agreement:
    """Top-1 agreement of the exit head with the verifier over every position >= start of each
    sequence, ungated, at temperature 0 (see the module docstring for the exact contract)."""
    return agreement(split, verifier_targets(split, sequences, start))


def greedy_targets(split: SplitModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[AgreementTargets]:
    """Agreement targets of each prompt's greedy continuation (as `greedy_continuations`) at the
    cost of decoding it alone: greedy decoding commits the verifier's argmax, so the top-1 after
    position t >= P - 1 is the token the sequence holds at t + 1, and the layer-k states are the
    ones decoding computed (recorded in float16, as trajectories carry them). Scored positions:
    P - 1 .. T - 2 (the last token's successor was never computed); top1 is -1 before P - 1."""
    decode = DecodeConfig(
        gamma=0, max_new_tokens=max_new_tokens, record_trajectories=True, record_topk=1, record_prompt_positions=0
    )
    decoder = SpeculativeDecoder(split)
    out = []
    for ids in prompts:
        traj = decoder.generate(list(ids), decode).trajectory
        top1 = traj.tokens[1:].clone()
        top1[: traj.prompt_length - 1] = -1
        out.append(AgreementTargets(hidden=traj.hidden.to(split.dtype), top1=top1, start=traj.prompt_length - 1))
    return out


def greedy_continuations(
    split: SplitModel, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[int]]:
    """(sequences, starts): each prompt [P] plus the model's greedy continuation (at most
    `max_new_tokens` new tokens, EOS stops), and start P - 1, the first position that predicts a
    generated token. Decoded losslessly with context drafting only: the result is the model's
    greedy output whatever the exit head holds."""
    decode = DecodeConfig(gamma=0, max_new_tokens=max_new_tokens)
    decoder = SpeculativeDecoder(split)
    sequences, starts = [], []
    for ids in prompts:
        result = decoder.generate(list(ids), decode)
        sequences.append(list(ids) + result.token_ids)
        starts.append(len(ids) - 1)
    return sequences, starts
