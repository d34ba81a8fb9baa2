"""Seed instructions the model writes itself, for a warm-start corpus wider than the shipped seeds.

An instruction-tuned model continues its chat template's empty user turn with a user request
(the Magpie recipe: no data beside the model). `self_instruct_prompts` samples such requests with
the lossless decoder at temperature 1, each seeded by its index, and keeps a request only when
the model ended the turn itself (an end-of-sequence id within `max_tokens`) and it holds at least
`min_tokens` tokens; exact duplicates are dropped. They never come from evaluation prompts.
"""

from __future__ import annotations

import torch

from common.core.config import DecodeConfig
from common.decoding.speculative import SpeculativeDecoder
from common.model.split import SplitModel

_MARK = "\x00user-request\x00"


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's token ids up to where a user's request starts (its default system turn
    included). ValueError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("self-written seed prompts need a chat model: this tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=False)
    return tokenizer(text[: text.index(_MARK)], add_special_tokens=False)["input_ids"]


def self_instruct_prompts(split: SplitModel, count: int, seed: int = 0, max_tokens: int = 64, min_tokens: int = 8,
                          max_attempts: int | None = None) -> list[str]:
    """Up to `count` distinct user requests the model writes (texts, special tokens removed), in
    the order sampled; attempt i is seeded by (seed, i). Stops after `max_attempts` (default
    4 * count) attempts, so a model that rarely ends a turn returns fewer."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    prefix = user_turn_prefix(split.tokenizer)
    decoder = SpeculativeDecoder(split)
    decode = DecodeConfig(gamma=0, temperature=1.0, max_new_tokens=max_tokens)
    out: list[str] = []
    seen: set[str] = set()
    for attempt in range(max_attempts if max_attempts is not None else 4 * count):
        if len(out) >= count:
            break
        generator = torch.Generator().manual_seed(seed * 1_000_003 + attempt)
        result = decoder.generate(prefix, decode, generator=generator, request_id=f"self-seed-{attempt}")
        if not result.finished_by_eos or len(result.token_ids) < min_tokens:
            continue
        text = split.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out
