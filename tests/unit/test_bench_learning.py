"""Unit tests of dvi.bench.learning: prompt halves, the 90%-of-gain figure, and the reports."""

from __future__ import annotations

import json

import pytest

from common.core.prompts import Prompt
from dvi.bench.learning import (
    interleave_categories,
    markdown_table,
    split_train_eval,
    summarize,
    tokens_to_fraction,
    write_bench_reports,
)


def prompts(spec: str) -> list[Prompt]:
    """'aaabbc' -> a0 a1 a2 b0 b1 c0 (category = letter, file order kept)."""
    counts: dict[str, int] = {}
    out = []
    for c in spec:
        out.append(Prompt(f"{c}{counts.get(c, 0)}", c, f"text {c}"))
        counts[c] = counts.get(c, 0) + 1
    return out


def ids(ps) -> list[str]:
    return [p.question_id for p in ps]


def test_interleave_is_round_robin_in_first_appearance_order():
    assert ids(interleave_categories(prompts("aaabbc"))) == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_split_halves_each_category_and_interleaves():
    train, held_out = split_train_eval(prompts("aaaabbbcc"))
    # a: a0 a1 | a2 a3; b: b0 b1 | b2 (ceil(3/2) = 2 train); c: c0 | c1
    assert ids(train) == ["a0", "b0", "c0", "a1", "b1"]
    assert ids(held_out) == ["a2", "b2", "c1", "a3"]


def test_split_of_singleton_categories_falls_back_to_the_interleaved_halves():
    train, held_out = split_train_eval(prompts("abc"))
    assert (ids(train), ids(held_out)) == (["a0", "b0"], ["c0"])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_train_eval(prompts("a"))


def point(step, tau, acceptance=0.0, tokens=0, traffic=0):
    return {"step": step, "tau": tau, "acceptance": acceptance, "tokens_seen": tokens, "traffic_tokens": traffic}


def test_tokens_to_90_percent_of_the_gain():
    pts = [point(0, 1.0, tokens=0), point(10, 1.5, tokens=100), point(20, 1.95, tokens=200), point(30, 2.0, tokens=300)]
    # goal = 1.0 + 0.9 * (2.0 - 1.0) = 1.9: first reached at tokens 200
    assert tokens_to_fraction(pts) == 200
    assert tokens_to_fraction(pts, 0.5) == 100  # goal 1.5, reached exactly
    assert tokens_to_fraction([point(0, 1.2), point(1, 1.1)]) is None  # no gain
    assert tokens_to_fraction([point(0, 1.2)]) is None


def test_summary_row_and_markdown():
    pts = [point(0, 1.0, 0.0, 0, 0), point(50, 1.4, 0.3, 640, 900), point(100, 1.5, 0.35, 1280, 1800)]
    row = summarize("kl-rl", pts)
    assert row == {
        "schedule": "kl-rl", "steps": 100, "tau_before": 1.0, "tau_after": 1.5,
        "acceptance_before": 0.0, "acceptance_after": 0.35, "tokens_seen": 1280, "traffic_tokens": 1800,
        "tokens_seen_to_90pct": 1280, "traffic_tokens_to_90pct": 1800,  # goal 1.45: only the last point
    }
    table = markdown_table([row])
    assert "| kl-rl | 100 | 1.000 | 1.500 | 0.000 | 0.350 | 1,280 | 1,800 | 1,800 |" in table


def test_bench_reports_are_written(tmp_path):
    runs = {
        "kl-rl": [point(0, 1.0, 0.0, 0, 0), point(10, 1.3, 0.2, 64, 100)],
        "kl-only": [point(0, 1.0, 0.0, 0, 0), point(10, 1.2, 0.1, 64, 100)],
    }
    markdown = write_bench_reports(tmp_path, {"model": "m", "exit_layer": 2, "command": "dvi bench learning"}, runs)
    record = json.loads((tmp_path / "learning.json").read_text())
    assert list(record["schedules"]) == ["kl-rl", "kl-only"]
    assert record["schedules"]["kl-rl"]["points"] == runs["kl-rl"]
    assert [r["tau_after"] for r in record["summary"]] == [1.3, 1.2]
    assert (tmp_path / "learning.png").stat().st_size > 1000
    assert (tmp_path / "learning.md").read_text() == markdown and "| kl-only | 10 |" in markdown


def test_agreement_columns_when_the_points_carry_agreement():
    pts = [{**point(0, 1.0, 0.0, 0, 0), "agreement": 0.1}, {**point(10, 1.2, 0.2, 64, 100), "agreement": 0.25}]
    row = summarize("kl-only", pts)
    assert (row["agreement_before"], row["agreement_after"]) == (0.1, 0.25)
    table = markdown_table([row])
    assert "| agreement before | agreement after |" in table
    assert "| kl-only | 10 | 1.000 | 1.200 | 0.000 | 0.200 | 0.100 | 0.250 | 64 | 100 | 100 |" in table
