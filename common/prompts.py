"""Spec-Bench-format prompt files and chat-template encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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
        raise ValueError("prompt is empty")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    ids = tokenizer(text)["input_ids"]
    return [int(i) for i in ids]
