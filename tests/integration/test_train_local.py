"""The single-process training loop on real models: it must raise held-out acceptance, and the
`dvi train-local` command must write its outputs and refuse a foreign checkpoint cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvi.cli import main
from learner.config import LearnerConfig, ScheduleConfig
from learner.learner import Learner
from learner.local import LocalLoopConfig, evaluate, train_local
from tests.helpers import head_only
from tests.tiny_models import STORIES, stories_split

TRAIN_OPENINGS = [
    "Once upon a time", "The little dog", "Tom and Sue", "One day, a bird", "The sun was", "Lily wanted to",
    "There was a big", "Mom said", "The cat was sad because", "Ben had a red", "In the park", "A little girl named",
    "The boy saw", "It was a sunny day", "The frog", "Sam liked to", "The old tree", "Anna and her friend",
]
EVAL_OPENINGS = [
    "The toy car", "At night, the moon", "Once there was a", "The big bear", "Max and Mia went",
    "A small fish", "The princess", "Grandma gave",
]


def test_local_loop_raises_held_out_acceptance_on_stories260k():
    torch.manual_seed(0)
    split = stories_split(exit_layer=2)  # untrained: acceptance ~0.13, tau ~1.5 on these openings
    tok = split.tokenizer
    train = [tok(t)["input_ids"] for t in TRAIN_OPENINGS]
    held_out = [tok(t)["input_ids"] for t in EVAL_OPENINGS]
    learner = Learner(split, LearnerConfig(
        schedule=ScheduleConfig(kind="kl-rl", warmup_steps=40, ramp_steps=40),
        head_lr=3e-3, lora_lr=3e-3, batch_tokens=64, seed=0,
    ))
    loop = LocalLoopConfig(steps=160, updates_per_request=4, publish_every=4, eval_every=80,
                           decode=head_only(gamma=4, max_new_tokens=32), seed=0)
    points = train_local(learner, train, held_out, loop)

    assert [p["step"] for p in points] == [0, 80, 160]
    before, after = points[0], points[-1]
    assert before["tokens_seen"] == 0 and after["tokens_seen"] == learner.counters()["tokens_seen"] > 0
    assert after["phase"] == "rl" and points[1]["phase"] == "ramp"
    assert learner.version == 40 and learner.counters()["skipped_steps"] == 0
    # the held-out drafter really improved (fixed seed; margins well inside the observed gain)
    assert after["acceptance"] >= before["acceptance"] + 0.15, (before, after)  # observed 0.096 -> 0.376
    assert after["tau"] >= before["tau"] * 1.3, (before, after)  # observed 1.35 -> 2.42
    # held-out top-1 agreement at every position (ungated) rose with it
    assert 0.0 <= before["agreement"] < after["agreement"] <= 1.0, (before, after)
    # the points are an honest re-measurement: evaluating again gives the same numbers
    again = evaluate(learner_decoder(learner), held_out, loop.held_out_decode)
    assert (again["tau"], again["acceptance"]) == (after["tau"], after["acceptance"])


def learner_decoder(learner):
    from common.decoding.speculative import SpeculativeDecoder

    return SpeculativeDecoder(learner.split)


def write_prompts(path: Path, texts: list[str], categories=("a", "b")) -> Path:
    rows = [{"question_id": i, "category": categories[i % len(categories)], "turns": [t]} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_local_command_writes_outputs_and_resumes(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", TRAIN_OPENINGS[:8])
    out = tmp_path / "run"
    args = ["train-local", "--model", str(STORIES), "--prompts", str(prompts), "--eval-prompts", str(prompts),
            "--exit-layer", "2", "--gamma", "3", "--max-new-tokens", "12", "--batch-tokens", "16",
            "--updates-per-request", "2", "--eval-every", "3", "--eval-limit", "2", "--threads", "1"]
    assert main(args + ["--steps", "4", "--out", str(out)]) == 0
    for name in ("adapter/adapter_model.safetensors", "adapter/dvi_adapter.json", "checkpoint/learner.json",
                 "learning.json", "learning.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "learning.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 3, 4]
    assert record["settings"]["train_prompts"] == 4 and record["settings"]["eval_prompts"] == 2  # halves of 8, limit 2
    assert "kl-rl: tau" in capsys.readouterr().out

    # resume the same run to 6 steps: the history is kept, the learner continues from step 4
    assert main(args + ["--steps", "6", "--resume", str(out), "--out", str(out)]) == 0
    record = json.loads((out / "learning.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 3, 4, 6]
    assert json.loads((out / "checkpoint/learner.json").read_text())["step"] == 6


def test_resume_from_another_exit_layer_fails_cleanly(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", TRAIN_OPENINGS[:4])
    base = ["train-local", "--model", str(STORIES), "--prompts", str(prompts), "--gamma", "2",
            "--max-new-tokens", "8", "--batch-tokens", "8", "--eval-limit", "1", "--steps", "1", "--threads", "1"]
    assert main(base + ["--exit-layer", "3", "--out", str(tmp_path / "other")]) == 0
    assert main(base + ["--exit-layer", "2", "--out", str(tmp_path / "mine")]) == 0
    mine = tmp_path / "mine" / "checkpoint"
    files = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    capsys.readouterr()

    code = main(base + ["--exit-layer", "2", "--steps", "3", "--resume", str(tmp_path / "other"),
                        "--out", str(tmp_path / "mine")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "exit layer 3" in err, err
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == files  # not overwritten


@pytest.mark.parametrize("flag,value,message", [
    ("--schedule", "kl-ppo", "unknown schedule"),
    ("--eval-limit", "0", "--eval-limit must be >= 1"),
    ("--steps", "0", "steps must be an integer >= 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flag, value, message):
    prompts = write_prompts(tmp_path / "p.jsonl", TRAIN_OPENINGS[:4])
    args = ["train-local", "--model", str(STORIES), "--prompts", str(prompts), "--steps", "2", "--out", str(tmp_path / "o")]
    args = [a for a in args]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_bench_learning_compares_schedules_from_the_same_start(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", TRAIN_OPENINGS[:8] + EVAL_OPENINGS[:4], categories=("a", "b", "c"))
    out, adapters = tmp_path / "docs", tmp_path / "runs"
    code = main(["bench", "learning", "--model", str(STORIES), "--prompts", str(prompts), "--steps", "4",
                 "--schedules", "kl-rl,kl-only", "--exit-layer", "2", "--gamma", "3", "--max-new-tokens", "12",
                 "--batch-tokens", "16", "--eval-every", "2", "--eval-limit", "3", "--threads", "1",
                 "--out", str(out), "--adapters-out", str(adapters)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["learning.json", "learning.md", "learning.png"]  # no adapters in docs
    for name in ("kl-rl", "kl-only"):
        assert (adapters / name / "adapter" / "adapter_model.safetensors").is_file()
    record = json.loads((out / "learning.json").read_text())
    runs = record["schedules"]
    assert [p["step"] for p in runs["kl-rl"]["points"]] == [0, 2, 4]
    start = [{k: v for k, v in runs[name]["points"][0].items() if k != "seconds"} for name in ("kl-rl", "kl-only")]
    assert start[0] == start[1] and start[0]["tokens_seen"] == 0  # one shared untrained evaluation
    assert record["settings"]["train_prompts"] == 6 and record["settings"]["eval_prompts"] == 3
    assert "| kl-only | 4 |" in capsys.readouterr().out


LONG_STORY = "Once upon a time there was a little dog who liked to run. " * 40  # > 512 tokens of stories260K


def test_train_local_skips_over_long_prompts_and_counts_them(tmp_path, caplog):
    texts = TRAIN_OPENINGS[:4] + [LONG_STORY] + TRAIN_OPENINGS[4:6] + [LONG_STORY]
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    out = tmp_path / "run"
    args = ["train-local", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2", "--gamma", "3",
            "--max-new-tokens", "12", "--batch-tokens", "16", "--eval-every", "3", "--threads", "1",
            "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "learning.json").read_text())
    # one file split in halves per category (a: 0 2 | 4 6, b: 1 3 | 5 7): the long 4 and 7 are held-out prompts
    assert record["skipped_requests"] == 2
    assert sorted(s["question_id"] for s in record["skipped"]) == ["4", "7"]
    assert all("exceeds the model's context of 512 tokens" in s["reason"] for s in record["skipped"])
    assert "skipped request 4" in caplog.text and "skipped request 7" in caplog.text
    assert record["points"][-1]["step"] == 3  # the run went on

    truncated = tmp_path / "cut"
    assert main(args[:-1] + [str(truncated), "--truncate-prompts"]) == 0
    assert json.loads((truncated / "learning.json").read_text())["skipped_requests"] == 0


def test_train_local_with_only_over_long_prompts_exits_2_with_one_line(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [LONG_STORY] * 4)
    code = main(["train-local", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2",
                 "--max-new-tokens", "12", "--steps", "2", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: every request of the training prompts was skipped (2; first: question 0:")
    assert not (tmp_path / "o" / "learning.json").exists()
