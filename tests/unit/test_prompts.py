"""Prompt files: Spec-Bench format, stratified subsets, clear errors."""

import json
from collections import Counter

import pytest

from common.core.errors import RequestRejected
from common.core.prompts import Prompt, encode_workload, fit_to_context, load_prompts, spec_bench_task
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


def test_fit_to_context_keeps_fitting_prompts_and_rejects_or_cuts_long_ones():
    assert fit_to_context([1, 2, 3], max_new_tokens=5, context=8, truncate=False) == ([1, 2, 3], False)
    assert fit_to_context([1, 2, 3], max_new_tokens=5, context=0, truncate=False) == ([1, 2, 3], False)  # unbounded
    with pytest.raises(RequestRejected, match=r"prompt \(4 tokens\) \+ max-new-tokens \(5\) exceeds the model's context of 8"):
        fit_to_context([1, 2, 3, 4], max_new_tokens=5, context=8, truncate=False)
    assert fit_to_context([1, 2, 3, 4], max_new_tokens=5, context=8, truncate=True) == ([2, 3, 4], True)  # the last 8-5
    with pytest.raises(RequestRejected, match="exceeds"):  # nothing could be kept
        fit_to_context([1], max_new_tokens=8, context=8, truncate=True)
    with pytest.raises(RequestRejected, match="empty"):
        fit_to_context([], max_new_tokens=1, context=8, truncate=True)


class WordTokenizer:
    """One token per word, no chat template."""

    chat_template = None

    def __call__(self, text):
        return {"input_ids": [len(w) for w in text.split()]}


def test_encode_workload_skips_bad_requests_with_a_warning_and_keeps_the_rest(caplog):
    prompts = [Prompt("ok-1", "qa", "a b c"), Prompt("long", "qa", "a " * 20), Prompt("ok-2", "qa", "d e"),
               Prompt("odd", "qa", "xxxxxxxxx")]

    def check(ids):  # the decoder's own check: here, word lengths stand for token ids in a vocab of 8
        if max(ids) >= 8:
            raise ValueError("prompt holds token ids outside the vocabulary")

    kept, skipped = encode_workload(prompts, WordTokenizer(), check, max_new_tokens=4, context=10)
    assert [(p.question_id, ids) for p, ids in kept] == [("ok-1", [1, 1, 1]), ("ok-2", [1, 1])]
    assert [s.question_id for s in skipped] == ["long", "odd"]
    assert "exceeds the model's context of 10" in skipped[0].reason and "vocabulary" in skipped[1].reason
    assert "skipped request long: prompt (20 tokens)" in caplog.text and "skipped request odd" in caplog.text
    kept, skipped = encode_workload(prompts[:2], WordTokenizer(), check, max_new_tokens=4, context=10, truncate=True)
    assert [ids for _, ids in kept] == [[1, 1, 1], [1] * 6] and skipped == []


def test_encode_workload_of_only_bad_requests_is_an_error():
    with pytest.raises(RequestRejected, match=r"every request of the workload was skipped \(2; first: question a: "):
        encode_workload([Prompt("a", "qa", "x " * 30), Prompt("b", "qa", " ")], WordTokenizer(), lambda ids: None,
                        max_new_tokens=4, context=10)
