"""Spec-Bench-format prompt files and chat-template encoding."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.core.errors import RequestRejected

log = logging.getLogger(__name__)


# The eight MT-bench categories that Spec-Bench reports as one task, "multi-turn conversation".
MT_BENCH_CATEGORIES = frozenset(
    {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
)


def spec_bench_task(category: str) -> str:
    """Spec-Bench's task for a question category: the eight MT-bench categories are "multi_turn"."""
    return "multi_turn" if category.strip().lower() in MT_BENCH_CATEGORIES else category.strip()


@dataclass(frozen=True)
class Prompt:
    """One benchmark or workload prompt: the first user turn of a Spec-Bench question."""

    question_id: str
    category: str
    text: str


def load_prompts(path: str | Path, limit: int | None = None, per_task: int | None = None) -> list[Prompt]:
    """Read a Spec-Bench-format JSONL file (`question_id`, `category`, `turns`); also accepts
    plain `{"prompt": ...}` lines. Raises ValueError naming the file and line on bad input.

    `per_task` keeps the first N prompts of each Spec-Bench task (see `spec_bench_task`), in
    file order, before `limit` applies: a stratified subset that covers every task."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    prompts: list[Prompt] = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object")
        turns = row.get("turns")
        text = turns[0] if isinstance(turns, list) and turns else row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{line_no}: needs a non-empty 'turns' list or 'prompt' string")
        task = spec_bench_task(str(row.get("category", "default")))
        if per_task is not None and sum(spec_bench_task(p.category) == task for p in prompts) >= per_task:
            continue
        prompts.append(
            Prompt(
                question_id=str(row.get("question_id", line_no)),
                category=str(row.get("category", "default")),
                text=text,
            )
        )
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as one user turn, through the model's chat template when it has one."""
    if not text.strip():
        raise RequestRejected("prompt is empty")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]


def fit_to_context(ids: list[int], max_new_tokens: int, context: int, truncate: bool) -> tuple[list[int], bool]:
    """(ids, truncated): the prompt as it can be served in `context` positions (0 = unbounded).

    A prompt that leaves no room for `max_new_tokens` is cut to its last tokens when `truncate`,
    else RequestRejected names both lengths. RequestRejected also for an empty prompt, and for
    `max_new_tokens` alone filling the context (nothing could be kept)."""
    if not ids:
        raise RequestRejected("prompt is empty")
    if not context or len(ids) + max_new_tokens <= context:
        return ids, False
    keep = context - max_new_tokens
    if not truncate or keep < 1:
        raise RequestRejected(
            f"prompt ({len(ids)} tokens) + max-new-tokens ({max_new_tokens}) exceeds the model's context of "
            f"{context} tokens"
        )
    return ids[-keep:], True


@dataclass(frozen=True)
class SkippedRequest:
    """A workload request that was not served, and why (the one-line reason shown to the user)."""

    question_id: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"question_id": self.question_id, "reason": self.reason}


def skipped_summary(skipped: Sequence[SkippedRequest]) -> dict:
    """How a report (summary.json, learning.json, speed.json) accounts for the requests it skipped."""
    return {"skipped_requests": len(skipped), "skipped": [s.as_dict() for s in skipped]}


def warn_skipped(skipped: SkippedRequest) -> None:
    """The one warning line every command prints for a request it skips."""
    log.warning("skipped request %s: %s", skipped.question_id, skipped.reason)


def require_some_served(served: int, skipped: Sequence[SkippedRequest], what: str = "workload") -> None:
    """RequestRejected (exit 2 at the CLI) when every request of a non-empty `what` was skipped."""
    if served == 0 and skipped:
        raise RequestRejected(f"every request of the {what} was skipped ({len(skipped)}; first: "
                              f"question {skipped[0].question_id}: {skipped[0].reason})")


def encode_workload(
    prompts: Sequence[Prompt],
    tokenizer,
    check: Callable[[list[int]], None],
    *,
    max_new_tokens: int,
    context: int,
    truncate: bool = False,
    what: str = "workload",
) -> tuple[list[tuple[Prompt, list[int]]], list[SkippedRequest]]:
    """Encode every prompt for serving: ([(prompt, ids)] in order, [skipped]).

    `check(ids)` raises ValueError for a request the decoder cannot serve (the decoder's own
    check_request); `fit_to_context` applies first. A prompt that fails is skipped with one
    warning line naming its question id and why; a workload whose every prompt fails raises
    RequestRejected."""
    kept: list[tuple[Prompt, list[int]]] = []
    skipped: list[SkippedRequest] = []
    for prompt in prompts:
        try:
            ids, _ = fit_to_context(encode_prompt(tokenizer, prompt.text), max_new_tokens, context, truncate)
            check(ids)
        except ValueError as exc:
            skipped.append(SkippedRequest(prompt.question_id, str(exc)))
            warn_skipped(skipped[-1])
            continue
        kept.append((prompt, ids))
    require_some_served(len(kept), skipped, what)
    return kept, skipped
