"""Prompt files: Spec-Bench format, stratified subsets, clear errors."""

import json
from collections import Counter

import pytest

from common.prompts import load_prompts, spec_bench_task
from tests.tiny_models import SPEC_BENCH


def test_per_task_takes_the_first_n_of_each_task_in_file_order():
    prompts = load_prompts(SPEC_BENCH, per_task=3)
    tasks = Counter(spec_bench_task(p.category) for p in prompts)
    assert tasks == {t: 3 for t in ("multi_turn", "translation", "summarization", "qa", "math_reasoning", "rag")}
    everything = load_prompts(SPEC_BENCH)
    assert len(everything) == 240
    first_translation = next(p for p in everything if p.category == "translation")
    assert first_translation in prompts


def test_bad_files_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
        load_prompts(path)
    path.write_text(json.dumps({"question_id": 1, "turns": []}) + "\n")
    with pytest.raises(ValueError, match=r":1: needs a non-empty"):
        load_prompts(path)
    with pytest.raises(ValueError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
