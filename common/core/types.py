"""The trajectory record: what one request's speculative decoding teaches the learner.

Words (drafter, verifier, accepted, rejected, bonus, weight version) as common/core/vocabulary.py
defines them.

One `Trajectory` holds all recorded drafted tokens of one request as a struct of arrays. The exit
head is an attention layer over layer-k states, so a drafted token's distribution depends on the
whole context, not only on its own input state: the record therefore carries the layer-k hidden
states of every committed position (`hidden`), and each drafted token points into it
(`position`). The learner re-runs the exit head over `hidden` to get context-correct drafter
log-probs under its current weights (trap 5 of the reference code).

Besides the drafted tokens (the drafter's actions, with rewards), every verifier pass also
scores positions no exit-head draft covers: the bonus position of a fully accepted block, every
position of a block drafted from the context (common/core/context_draft.py) or decoded without a
draft. Their verifier distributions are kept too (`verified_*`): distillation targets for the
KL term that cost nothing extra to collect. `tokens` is the whole sequence, from which the
learner learns which tokens the traffic uses (the draft vocabulary).

Shapes: T context positions, N drafted tokens, M extra verified positions, K recorded verifier
log-probs per row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

SCHEMA_VERSION = 2
MAX_REQUEST_ID_CHARS = 256
"""Longest request id a trajectory may carry (ids are kept in the learner's dedupe window)."""

# name -> (dtype, rank); the codec and `validate` both read this table.
TENSOR_FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "hidden": (torch.float16, 2),
    "tokens": (torch.int64, 1),
    "position": (torch.int64, 1),
    "block_index": (torch.int64, 1),
    "token": (torch.int64, 1),
    "target_token": (torch.int64, 1),
    "accepted": (torch.bool, 1),
    "drafter_logprob": (torch.float32, 1),
    "verifier_topk_ids": (torch.int64, 2),
    "verifier_topk_logprobs": (torch.float32, 2),
    "timestamp": (torch.float64, 1),
    "verified_position": (torch.int64, 1),
    "verified_topk_ids": (torch.int64, 2),
    "verified_topk_logprobs": (torch.float32, 2),
}
DRAFTED_FIELDS = (
    "position", "block_index", "token", "target_token", "accepted", "drafter_logprob",
    "verifier_topk_ids", "verifier_topk_logprobs", "timestamp",
)
"""The fields with one row per drafted token (N rows)."""
VERIFIED_FIELDS = ("verified_position", "verified_topk_ids", "verified_topk_logprobs")
"""The fields with one row per extra verified position (M rows)."""
SCALAR_FIELDS: dict[str, type] = {
    "request_id": str,
    "weight_version": int,
    "exit_layer": int,
    "temperature": float,
    "created_at": float,
    "prompt_length": int,
}


class TrajectoryError(ValueError):
    """A trajectory that breaks the documented contract (bad shape, dtype or index)."""


@dataclass
class Trajectory:
    """All recorded drafted tokens of one request.

    Fields (T context positions, N drafted tokens, K verifier log-probs per token, H hidden size):
      request_id: str               unique id of the request that produced it.
      weight_version: int           adapter version that drafted every token here (>= 0).
      exit_layer: int               k, the layer whose output `hidden` holds.
      temperature: float            decoding temperature (0 = greedy) the drafter sampled at.
      created_at: float             unix seconds when the trajectory was closed.
      prompt_length: int            P: tokens[:P] is the prompt, tokens[P:] the committed tokens.
      hidden: [T, H] float16        layer-k hidden state of committed positions 0..T-1 (the exit
                                    head's whole context, prompt included).
      tokens: [T + 1] int64         the sequence: prompt then committed tokens (the last one has
                                    no hidden state: it is the next block's input).
      position: [N] int64           index into `hidden` of the input state that drafted the token;
                                    the token is a guess for sequence position `position + 1`.
      block_index: [N] int64        0-based place of the token in its draft block.
      token: [N] int64              the drafted token id.
      target_token: [N] int64       the token the verifier committed at that position (equal to
                                    `token` where accepted, the correction where rejected).
      accepted: [N] bool            reward r: True accepted, False the block's first rejection.
      drafter_logprob: [N] float32  log q(token) under the drafting weights (behaviour policy).
      verifier_topk_ids: [N, K] int64         ids of the verifier's K most likely tokens.
      verifier_topk_logprobs: [N, K] float32  their log-probs (log-softmax over the full
                                    vocabulary at temperature 1); K == V when kept in full.
      timestamp: [N] float64        unix seconds at which the token was verified.
      verified_position: [M] int64  positions (indices into `hidden`) whose next token the verifier
                                    scored, not covered by `position`: committed tokens, and
                                    prompt positions the prefill kept (DecodeConfig.record_prompt_positions).
      verified_topk_ids / verified_topk_logprobs: [M, K]  the verifier's top-K there, as above.
    Invariants: `position` is non-decreasing and < T; each block's records are a run of accepted
    tokens optionally followed by exactly one rejected one; `position` and `verified_position`
    are disjoint; `position` >= P - 1 (drafts follow the prompt), `verified_position` >= 0.
    """

    request_id: str
    weight_version: int
    exit_layer: int
    temperature: float
    created_at: float
    prompt_length: int
    hidden: torch.Tensor
    tokens: torch.Tensor
    position: torch.Tensor
    block_index: torch.Tensor
    token: torch.Tensor
    target_token: torch.Tensor
    accepted: torch.Tensor
    drafter_logprob: torch.Tensor
    verifier_topk_ids: torch.Tensor
    verifier_topk_logprobs: torch.Tensor
    timestamp: torch.Tensor
    verified_position: torch.Tensor
    verified_topk_ids: torch.Tensor
    verified_topk_logprobs: torch.Tensor

    @property
    def num_drafted(self) -> int:
        return int(self.token.shape[0])

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def num_context(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def num_verified(self) -> int:
        return int(self.verified_position.shape[0])

    @property
    def num_scored(self) -> int:
        """Positions with a verifier distribution: drafted tokens plus extra verified positions."""
        return self.num_drafted + self.num_verified

    @property
    def committed_tokens(self) -> torch.Tensor:
        """[T + 1 - P] the tokens this request generated."""
        return self.tokens[self.prompt_length:]

    def validate(self) -> "Trajectory":
        """Check every documented shape, dtype and index; raise TrajectoryError naming the first breach."""
        for name, kind in SCALAR_FIELDS.items():
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TrajectoryError(f"{name} must be {kind.__name__}, got {type(value).__name__}")
        if not self.request_id or len(self.request_id) > MAX_REQUEST_ID_CHARS:
            raise TrajectoryError(f"request_id must have 1..{MAX_REQUEST_ID_CHARS} characters, got {len(self.request_id)}")
        if self.weight_version < 0:
            raise TrajectoryError(f"weight_version must be >= 0, got {self.weight_version}")
        if self.exit_layer < 1:
            raise TrajectoryError(f"exit_layer must be >= 1, got {self.exit_layer}")
        if self.prompt_length < 1:
            raise TrajectoryError(f"prompt_length must be >= 1, got {self.prompt_length}")
        for name, (dtype, rank) in TENSOR_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TrajectoryError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.dtype != dtype or value.dim() != rank:
                raise TrajectoryError(
                    f"{name} must be a rank-{rank} {dtype} tensor, got rank-{value.dim()} {value.dtype}"
                )
        for group, count, label in ((DRAFTED_FIELDS, self.num_drafted, "N"), (VERIFIED_FIELDS, self.num_verified, "M")):
            for name in group:
                if getattr(self, name).shape[0] != count:
                    raise TrajectoryError(f"{name} has {getattr(self, name).shape[0]} rows, expected {label}={count}")
        if self.tokens.shape[0] != self.num_context + 1:
            raise TrajectoryError(f"tokens has {self.tokens.shape[0]} entries, expected T + 1 = {self.num_context + 1}")
        if self.prompt_length > self.tokens.shape[0]:
            raise TrajectoryError(f"prompt_length {self.prompt_length} exceeds the {self.tokens.shape[0]} tokens")
        for ids, logprobs in (("verifier_topk_ids", "verifier_topk_logprobs"), ("verified_topk_ids", "verified_topk_logprobs")):
            if getattr(self, ids).shape != getattr(self, logprobs).shape:
                raise TrajectoryError(f"{ids} and {logprobs} differ in shape")
        for name, lowest in (("position", self.prompt_length - 1), ("verified_position", 0)):
            where = getattr(self, name)
            if where.numel() and (int(where.min()) < lowest or int(where.max()) >= self.num_context):
                raise TrajectoryError(f"{name} must index hidden's rows [{lowest}, {self.num_context})")
        if self.num_drafted and self.num_verified and bool(torch.isin(self.verified_position, self.position).any()):
            raise TrajectoryError("verified_position and position overlap")
        if self.num_drafted and int(self.block_index.min()) < 0:
            raise TrajectoryError("block_index must be >= 0")
        if not torch.isfinite(self.hidden.float()).all():
            raise TrajectoryError("hidden holds non-finite values")
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_FIELDS}

    def scalars(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SCALAR_FIELDS}


assert {f.name for f in fields(Trajectory)} == set(TENSOR_FIELDS) | set(SCALAR_FIELDS)
