"""`dvi bench speed` end to end on the real stories260K (no chat template): schema, rows, losslessness."""

import json

from dvi.bench.speed import BUILTIN_METHODS, RENAMED_ROW_FIELDS, ROW_FIELDS
from dvi.cli import main
from tests.tiny_models import STORIES, randomize_adapter, stories_split

STORY_PROMPTS = [
    ("writing", "Once upon a time, there was a little girl named Lily."),
    ("summarization", "Tom had a big red ball. He liked to play with it in the park."),
    ("roleplay", "One day, a cat and a dog went to the park to play."),
    ("qa", "The sun was shining and the birds were singing."),
]


def write_prompts(path):
    lines = [
        json.dumps({"question_id": i + 1, "category": cat, "turns": [text, "A second turn, never used."]})
        for i, (cat, text) in enumerate(STORY_PROMPTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_speed_end_to_end(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "bench"
    code = main([
        "bench", "speed", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2",
        "--limit", "3", "--max-new-tokens", "16", "--warmup", "1", "--out", str(out),
        "--threads", "1",  # a tiny model on a shared CPU: more threads only spin
    ])
    assert code == 0
    report = json.loads((out / "speed.json").read_text())
    assert set(report) == {"model", "machine", "settings", "skipped_requests", "skipped", "runs"}
    assert report["skipped_requests"] == 0 and report["skipped"] == []
    assert {"platform", "processor", "cpu_count", "torch", "threads", "device"} <= set(report["machine"])
    assert report["settings"]["max_new_tokens"] == 16 and report["settings"]["prompts_used"] == 3
    assert report["machine"]["threads"] == 1

    runs = report["runs"]
    assert all(tuple(row) == ROW_FIELDS + tuple(RENAMED_ROW_FIELDS) for row in runs)  # + the old names
    # the first 3 prompts: writing + roleplay are Spec-Bench's multi_turn task
    categories = ["overall", "multi_turn", "summarization"]
    assert [(r["category"], r["method"]) for r in runs] == [(c, m) for c in categories for m in BUILTIN_METHODS]
    by = {(r["method"], r["category"]): r for r in runs}
    assert by["hf_ar", "overall"]["prompts"] == 3 and by["dvi", "multi_turn"]["prompts"] == 2
    for row in runs:
        assert row["identical_to_ar"] == 1.0, row  # every method is greedy and lossless
        assert row["tokens"] == by["hf_ar", row["category"]]["tokens"] > 0
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0 and row["speedup_vs_hf_ar"] > 0
        assert row["tau"] is not None and row["tau"] >= 1.0
        assert row["mean_accepted"] == row["tau"]  # the old name, kept for one release
    assert by["hf_ar", "overall"]["speedup_vs_hf_ar"] == 1.0
    assert by["hf_ar", "overall"]["tau"] == 1.0 and by["ar", "overall"]["tau"] == 1.0

    assert (out / "speed.md").read_text().count("| overall |") == len(BUILTIN_METHODS)
    assert (out / "speed.png").stat().st_size > 0
    assert len((out / "speed_runs.jsonl").read_text().splitlines()) == 3 * len(BUILTIN_METHODS)
    assert "| hf_early_exit | overall |" in capsys.readouterr().out


def test_bench_speed_variant_adapter(tmp_path):
    split = stories_split(exit_layer=2)
    randomize_adapter(split, seed=3, scale=0.3)
    adapter = split.save_adapter(tmp_path / "adapter")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "bench"
    code = main([
        "bench", "speed", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2",
        "--limit", "1", "--max-new-tokens", "8", "--warmup", "0", "--methods", "hf_ar,dvi",
        "--variant", f"dvi_random={adapter}", "--out", str(out), "--threads", "1",
    ])
    assert code == 0
    runs = json.loads((out / "speed.json").read_text())["runs"]
    assert [r["method"] for r in runs if r["category"] == "overall"] == ["hf_ar", "dvi", "dvi_random"]
    assert all(r["identical_to_ar"] == 1.0 for r in runs)


def test_bench_speed_bad_flags_are_one_line_errors(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    base = ["bench", "speed", "--model", str(STORIES), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main(base + ["--methods", "hf_ar,medusa"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(base + ["--methods", "ar,dvi"]) == 2
    assert "must include hf_ar" in capsys.readouterr().err
    assert main(base + ["--variant", "x=/nonexistent/adapter"]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    assert main(base + ["--exit-layer", "9"]) == 2  # stories260K has 5 layers
    assert "exit layer 9 is out of range" in capsys.readouterr().err
    assert main(base + ["--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def write_stories_workload(path, per_category: int = 4):
    """Two 'tasks' of story openings: enough for a learning half and a timed half."""
    openings = ["Once upon a time", "Tom and Sue", "The little dog", "One day, a bird", "Lily wanted to",
                "The sun was", "Ben had a red", "In the park"]
    lines = []
    for i in range(per_category):
        for category in ("qa", "summarization"):
            text = openings[(i * 2 + (category == "qa")) % len(openings)]
            lines.append(json.dumps({"question_id": len(lines) + 1, "category": category, "turns": [text]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bench_speed_learns_online_then_times_the_held_out_half(tmp_path):
    prompts = write_stories_workload(tmp_path / "stories.jsonl")
    out = tmp_path / "bench"
    code = main([
        "bench", "speed", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2",
        "--max-new-tokens", "24", "--warmup", "0", "--methods", "hf_ar,ar,dvi_context,dvi", "--learn", "kl-only,kl-rl",
        "--learn-batch-tokens", "16", "--lookup-tokens", "4", "--out", str(out), "--threads", "1",
    ])
    assert code == 0
    report = json.loads((out / "speed.json").read_text())
    overall = [r for r in report["runs"] if r["category"] == "overall"]
    assert [r["method"] for r in overall] == ["hf_ar", "ar", "dvi_context", "dvi", "dvi_kl-only", "dvi_kl-rl"]
    assert all(r["identical_to_ar"] == 1.0 and r["prompts"] == 4 for r in overall)  # the held-out half only
    agreement = report["settings"]["agreement"]
    assert list(agreement) == ["dvi", "dvi_kl-only", "dvi_kl-rl"] and all(0.0 <= a <= 1.0 for a in agreement.values())
    learning = report["settings"]["learning"]
    assert learning["prompts"] == 4
    for kind in ("kl-only", "kl-rl"):
        summary = learning["schedules"][kind]
        assert summary["requests"] == 4 and summary["steps"] > 0 and summary["tokens_seen"] > 0
        assert (out / "adapters" / kind / "adapter_model.safetensors").is_file()


def test_bench_ablation_switches_each_lever_off(tmp_path, capsys):
    split = stories_split(exit_layer=2)
    randomize_adapter(split, seed=3, scale=0.3)
    adapter = split.save_adapter(tmp_path / "adapter")
    prompts = write_stories_workload(tmp_path / "stories.jsonl", per_category=2)
    out = tmp_path / "ablation"
    code = main([
        "bench", "ablation", "--model", str(STORIES), "--prompts", str(prompts), "--adapter", str(adapter),
        "--max-new-tokens", "16", "--warmup", "0", "--context-tokens", "4", "--held-out", "--out", str(out),
        "--threads", "1",
    ])
    assert code == 0
    report = json.loads((out / "ablation.json").read_text())
    overall = {r["method"]: r for r in report["runs"] if r["category"] == "overall"}
    from dvi.bench.ablation import LEVERS

    assert list(overall) == ["hf_ar", "ar", "dvi"] + [f"dvi-{lever}" for lever in LEVERS]
    assert all(r["identical_to_ar"] == 1.0 and r["prompts"] == 2 for r in overall.values())
    table = capsys.readouterr().out
    assert "| dvi-engine | the HF decoder layers" in table and (out / "ablation.md").is_file()


def test_bench_speed_skips_and_counts_an_over_long_prompt(tmp_path, capsys, caplog):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    with prompts.open("a") as fh:  # stories260K's context is 512 tokens: this one cannot fit 16 new tokens
        fh.write(json.dumps({"question_id": "long-1", "category": "qa", "turns": ["Once upon a time " * 200]}) + "\n")
    out = tmp_path / "bench"
    code = main(["bench", "speed", "--model", str(STORIES), "--prompts", str(prompts), "--exit-layer", "2",
                 "--methods", "hf_ar,ar", "--max-new-tokens", "16", "--warmup", "0", "--out", str(out), "--threads", "1"])
    assert code == 0
    report = json.loads((out / "speed.json").read_text())
    assert report["skipped_requests"] == 1 and report["skipped"][0]["question_id"] == "long-1"
    assert "exceeds the model's context of 512 tokens" in report["skipped"][0]["reason"]
    assert report["settings"]["prompts_used"] == 4  # every good prompt still timed
    assert "skipped request long-1" in caplog.text


def test_learned_drafters_start_from_the_dvi_drafter_and_dvi_context_never_asks_the_head(tmp_path, monkeypatch):
    import torch
    from rich.console import Console

    import dvi.bench.online as online
    from dvi.bench.online import LearningSummary
    from dvi.bench.speed import PassCounter, SpeedSettings, build_methods
    from dvi.commands.bench_speed import _drafters

    split = stories_split(exit_layer=2)
    randomize_adapter(split, seed=4, scale=0.3)
    adapter = split.save_adapter(tmp_path / "adapter")
    fresh = stories_split(exit_layer=2)  # the default drafter, with --adapter on top
    started = {}

    def fake_learn(learner_split, kind, prompts, settings, **kwargs):
        started[kind] = learner_split.adapter_state()
        return LearningSummary(kind, 0, 0, 0, 0, 0, 0, 0, 0.0)

    monkeypatch.setattr(online, "learn_online", fake_learn)
    settings = SpeedSettings(prompts="p", model=str(STORIES), exit_layer=2, methods=("hf_ar", "dvi_context", "dvi"),
                             learn=("kl-only", "kl-rl"), adapter=str(adapter), draft_vocab_size=0)
    drafters, _ = _drafters(settings, fresh, [[1, 2, 3]], tmp_path / "out", Console(file=open("/dev/null", "w")))
    assert list(drafters) == ["dvi", "dvi_kl-only", "dvi_kl-rl"] and drafters["dvi"] is fresh
    reference = split.adapter_state()
    for kind in ("kl-only", "kl-rl"):
        assert started[kind].keys() == reference.keys()
        assert all(torch.equal(started[kind][k], reference[k]) for k in reference), kind
    calls = []
    monkeypatch.setattr(type(fresh), "draft", lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    with PassCounter(fresh.layers[-1]) as counter:
        methods = build_methods(fresh, settings, counter, drafters)
    ids = fresh.tokenizer("Tom and Sue went to the park. Tom and Sue")["input_ids"]
    tokens, passes = methods["dvi_context"](ids)
    assert calls == [] and len(tokens) > passes  # context drafts only, and they were accepted
