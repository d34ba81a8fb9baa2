"""Seed instructions the model writes itself, for a warm-start corpus wider than the shipped seeds.

An instruction-tuned model continues its chat template's empty user turn with a user request
(the Magpie recipe: no data beside the model). `self_instruct_prompts` samples such requests with
the lossless decoder at temperature 1, attempt i seeded by (seed, i), and keeps a request only
when the model ended the turn itself (an end-of-sequence id within `max_tokens`) and it holds at
least `min_tokens` tokens; exact duplicates are dropped, in attempt order. They never come from
evaluation prompts.

Attempts are independent, so they run on every core (`workers`, `learner.workers.model_pool`)
and their outcomes, kept or not, can be cached (`cache_dir`): the result is the same list
whichever of these is used, and a later call that asks for more attempts only the new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from common.core.config import DecodeConfig, ModelSpec
from common.decoding.speculative import SpeculativeDecoder
from common.model.split import SplitModel
from learner.workers import model_pool, worker_split

_MARK = "\x00user-request\x00"
_ROUND = 256
"""Most attempts between two cache writes (an interrupted run loses at most this many)."""
_TASK = 16
"""Attempts per worker task."""


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's token ids up to where a user's request starts (its default system turn
    included). ValueError when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("self-written seed prompts need a chat model: this tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=False)
    return tokenizer(text[: text.index(_MARK)], add_special_tokens=False)["input_ids"]


def attempt_requests(split: SplitModel, attempts: Sequence[int], seed: int, max_tokens: int, min_tokens: int,
                     rows: int = 1) -> list[str | None]:
    """The request each attempt wrote (text, special tokens removed), None where it is not kept
    (the turn did not end within `max_tokens`, or it is shorter than `min_tokens` or empty).

    rows 1: each attempt decoded alone by the speculative decoder (context drafting on); above 1:
    that many attempts per verifier pass (`SpeculativeDecoder.generate_batch`, drafting off: other
    text from the same seeds, the same distribution)."""
    prefix = user_turn_prefix(split.tokenizer)
    decoder = SpeculativeDecoder(split)
    decode = attempt_config(max_tokens, rows)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + attempt) for attempt in attempts]
    request_ids = [f"self-seed-{attempt}" for attempt in attempts]
    if rows > 1:
        results = decoder.generate_batch([prefix] * len(attempts), decode, generators=generators,
                                         request_ids=request_ids, rows=rows)
    else:
        results = [decoder.generate(prefix, decode, generator=g, request_id=r) for g, r in zip(generators, request_ids)]
    out: list[str | None] = []
    for result in results:
        text = split.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()
        kept = result.finished_by_eos and len(result.token_ids) >= min_tokens and text
        out.append(text if kept else None)
    return out


def attempt_config(max_tokens: int, rows: int) -> DecodeConfig:
    """How an attempt is decoded: temperature 1, no exit-head drafts; context drafting only when
    attempts are decoded one at a time (rows 1)."""
    return DecodeConfig(gamma=0, temperature=1.0, max_new_tokens=max_tokens,
                        context_tokens=DecodeConfig.context_tokens if rows == 1 else 0)


def _worker_attempts(attempts: list[int], seed: int, max_tokens: int, min_tokens: int, rows: int) -> list[str | None]:
    return attempt_requests(worker_split(), attempts, seed, max_tokens, min_tokens, rows)


class _AttemptCache:
    """Outcomes of attempts ({"attempt": i, "request": text or null} lines) in one JSONL file per
    model and settings; a line that does not parse (a write cut short) is dropped."""

    def __init__(self, directory: str | Path, split: SplitModel, seed: int, max_tokens: int, min_tokens: int,
                 rows: int) -> None:
        settings = {"model": split.fingerprint, "prefix": user_turn_prefix(split.tokenizer), "seed": seed,
                    "max_tokens": max_tokens, "min_tokens": min_tokens, "temperature": 1.0}
        if rows > 1:  # other text than one attempt at a time (1 keeps the name it always had)
            settings["sampler"] = "batch-rows"
        name = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory) / f"self_seeds-{name}.jsonl"

    def load(self) -> dict[int, str | None]:
        out: dict[int, str | None] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                attempt, request = int(row["attempt"]), row["request"]
            except (ValueError, KeyError, TypeError):
                continue
            if request is None or isinstance(request, str):
                out[attempt] = request
        return out

    def add(self, outcomes: dict[int, str | None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(json.dumps({"attempt": a, "request": r}) + "\n" for a, r in sorted(outcomes.items())))


def self_instruct_prompts(split: SplitModel, count: int, seed: int = 0, max_tokens: int = 64, min_tokens: int = 8,
                          max_attempts: int | None = None, workers: int = 1, spec: ModelSpec | None = None,
                          cache_dir: str | Path | None = None, rows: int = 1,
                          on_progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Up to `count` distinct user requests the model writes, in attempt order; stops after
    `max_attempts` (default 4 * count) attempts, so a model that rarely ends a turn returns fewer.

    `workers` > 1 runs attempts in that many processes, each loading `spec` (the model `split` was
    loaded from); `cache_dir` keeps every attempt's outcome; neither changes the result. `rows` > 1
    decodes that many attempts per verifier pass (`attempt_requests`): other requests, made faster.
    `on_progress(kept, count)` before each round of attempts and at the end."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and spec is None:
        raise ValueError("writing seed instructions in worker processes needs the ModelSpec the split was loaded from")
    user_turn_prefix(split.tokenizer)  # a model without a chat template fails here, before any work
    limit = max_attempts if max_attempts is not None else 4 * count
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cache = _AttemptCache(cache_dir, split, seed, max_tokens, min_tokens, rows) if cache_dir is not None else None
    outcomes = cache.load() if cache is not None else {}
    pool = None
    out: list[str] = []
    seen: set[str] = set()
    try:
        attempt = 0
        while len(out) < count and attempt < limit:
            if attempt not in outcomes:
                if on_progress is not None:
                    on_progress(len(out), count)
                wanted = min(_ROUND, max(math.ceil((count - len(out)) * 1.25), workers))
                todo = [a for a in range(attempt, min(limit, attempt + wanted)) if a not in outcomes]
                if workers > 1 and pool is None:
                    pool = model_pool(spec, workers)
                new = _run_attempts(split, todo, seed, max_tokens, min_tokens, rows, pool)
                outcomes.update(new)
                if cache is not None:
                    cache.add(new)
            request = outcomes[attempt]
            if request is not None and request not in seen:
                seen.add(request)
                out.append(request)
            attempt += 1
        if on_progress is not None:
            on_progress(len(out), count)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def _run_attempts(split: SplitModel, todo: list[int], seed: int, max_tokens: int, min_tokens: int, rows: int,
                  pool) -> dict[int, str | None]:
    """{attempt: outcome} for `todo`, here or split in tasks over `pool`."""
    if pool is None:
        return dict(zip(todo, attempt_requests(split, todo, seed, max_tokens, min_tokens, rows)))
    size = max(_TASK, rows)
    tasks = [todo[i : i + size] for i in range(0, len(todo), size)]
    futures = [pool.submit(_worker_attempts, task, seed, max_tokens, min_tokens, rows) for task in tasks]
    return {a: r for task, future in zip(tasks, futures) for a, r in zip(task, future.result())}
