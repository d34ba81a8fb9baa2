"""A learning record of a sequence that was not decoded here: one teacher-forced verifier pass.

The speculative decoder records a Trajectory as it decodes. Text made elsewhere (sampled in a
batch, read from a file) gets the same record from `scored_trajectory`: one pass of the split's
shallow and deep layers over the whole sequence gives the layer-k states of every position and
the verifier's top-K there, the same fields a decoded request records with every position kept
(`DecodeConfig.record_prompt_positions` covering the prompt), and no drafted rows.
"""

from __future__ import annotations

from typing import Sequence

import torch

from common.core.types import Trajectory
from common.decoding.speculative import TrajectoryRecorder
from common.model.split import SplitModel


@torch.inference_mode()
def scored_trajectory(
    split: SplitModel, tokens: Sequence[int], prompt_length: int, topk: int, request_id: str, temperature: float
) -> Trajectory:
    """The Trajectory of `tokens` (prompt then continuation, T + 1 >= 2 ids in [0, V)) as the
    frozen verifier scores it: hidden [T, H] float16 layer-k states of positions 0..T-1,
    verified_position = 0..T-1 with the verifier's top-`topk` log-probs (temperature 1, full
    vocabulary; all V when topk is 0) of the token after each, no drafted rows, weight version 0.
    `temperature` is recorded as the one the text was sampled at. ValueError for fewer than two
    tokens, ids outside the vocabulary or a prompt_length outside [1, T + 1]."""
    if len(tokens) < 2:
        raise ValueError(f"a scored trajectory needs at least 2 tokens, got {len(tokens)}")
    if not 1 <= prompt_length <= len(tokens):
        raise ValueError(f"prompt_length must be in [1, {len(tokens)}], got {prompt_length}")
    every = torch.tensor(list(tokens), dtype=torch.int64)
    if int(every.min()) < 0 or int(every.max()) >= split.vocab_size:
        raise ValueError(f"tokens hold ids outside [0, {split.vocab_size})")
    ids = every[None, :-1].to(split.device)  # the last token has no state
    positions = torch.arange(ids.shape[1], device=split.device)[None]
    cache = split.new_cache(ids.shape[1])
    hidden = split.shallow(ids, positions, cache)  # [1, T, H]
    logits = split.deep(hidden, positions, cache)  # [1, T, V]
    recorder = TrajectoryRecorder(topk)
    recorder.add_verified(list(range(ids.shape[1])), logits[0].cpu())
    return recorder.build(request_id, 0, split.exit_layer, temperature, hidden[0].cpu(), list(tokens), prompt_length,
                          split.vocab_size)
