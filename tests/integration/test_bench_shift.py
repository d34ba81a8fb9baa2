"""`dvi bench shift` end to end on stories260K with tiny settings: it learns through the switch
without a restart and writes shift.json, shift.md and shift.png."""

from __future__ import annotations

import json

from dvi.cli import main
from tests.tiny_models import STORIES

OPENINGS = {"translation": ["Once upon a time", "Tom and Sue", "The little dog"],
            "math_reasoning": ["One day, a bird", "Lily wanted to", "The sun was"]}


def test_bench_shift_learns_through_the_switch_and_reports_recovery(tmp_path, capsys):
    rows = [{"question_id": f"{c}-{i}", "category": c, "turns": [t]} for c, ts in OPENINGS.items() for i, t in enumerate(ts)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shift"
    code = main(["bench", "shift", "--model", str(STORIES), "--prompts", str(prompts), "--from", "translation",
                 "--to", "math_reasoning", "--from-requests", "4", "--to-requests", "5", "--exit-layer", "2",
                 "--max-new-tokens", "16", "--learn-batch-tokens", "16", "--window", "2", "--draft-vocab-size", "0",
                 "--out", str(out), "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "shift.json").read_text())
    assert [r["phase"] for r in report["requests"]] == ["source"] * 4 + ["target"] * 5  # 3 prompts, cycled
    versions = [r["version"] for r in report["requests"]]
    assert versions == sorted(versions) and versions[-1] > versions[4] > 0  # one learner, never restarted
    curve = report["curve"]
    xs = [p["tokens_since_switch"] for p in curve]
    assert xs == sorted(xs) and xs[3] == 0 and xs[4] > 0
    summary = report["summary"]
    assert summary["target_tokens"] == sum(r["tokens"] for r in report["requests"][4:])
    recover = summary["tokens_to_recover_tau"]
    assert recover is None or 0 < recover <= summary["target_tokens"]
    assert report["learning"]["steps"] > 0 and report["learning"]["requests"] == 9
    assert (out / "shift.png").stat().st_size > 0 and "tokens since the switch" in (out / "shift.md").read_text()
    capsys.readouterr()
    assert main(["bench", "shift", "--model", str(STORIES), "--prompts", str(prompts), "--from", "qa",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no prompt of task 'qa'" in capsys.readouterr().err
