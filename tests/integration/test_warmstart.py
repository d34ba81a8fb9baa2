"""Warm start by self-distillation (learner/warmstart.py) on the real stories260K, and the default
drafter's look-up of a warm start (common/model/warm_start.py) with its fall-back to the untrained head."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from common.decoding.agreement import agreement, greedy_targets
from common.core.config import DrafterConfig, ModelSpec
from common.model.split import SplitModel
from common.core.prompts import encode_prompt, load_prompts
from common.model.warm_start import installed_warm_start_dir
from dvi.bench.learning import interleave_categories, split_train_eval
from dvi.commands.warmstart import SEEDS
from learner.warmstart import WarmStartConfig, generate_corpus, train_warm_start
from tests.tiny_models import SPEC_BENCH, STORIES, stories_split

GREEDY = {"temperature": 0.0, "samples_per_prompt": 1}  # one greedy continuation per seed prompt


def test_warm_start_improves_held_out_agreement_on_stories260k():
    torch.manual_seed(0)
    split = stories_split(exit_layer=2)
    seeds = interleave_categories(load_prompts(SEEDS))[:24]
    config = WarmStartConfig(max_new_tokens=24, epochs=4, chunks=2, seed=0)  # the default recipe: sampled, several per prompt
    corpus, _ = generate_corpus(split, [encode_prompt(split.tokenizer, p.text) for p in seeds], config)
    assert len(corpus) == 24 * config.samples_per_prompt and all(t.verified_position.min() == 0 for t in corpus)  # prompt positions distilled too
    held = split_train_eval(load_prompts(SPEC_BENCH))[1][:6]  # never trained on: Spec-Bench held-out half
    targets = greedy_targets(split, [encode_prompt(split.tokenizer, p.text) for p in held], 16)
    _, points = train_warm_start(split, corpus, targets, config)
    untrained, warm = points[0].agreement, points[-1].agreement
    assert agreement(split, targets).rate == warm and len(points) == 3
    assert warm >= untrained + 0.10, (untrained, warm)  # measured 0.26 -> 0.64 at 3 samples per prompt, 0.26 -> 0.63 at 6 (greedy corpus: 0.25 -> 0.5+)


def test_the_default_drafter_starts_from_an_installed_warm_start_and_falls_back_when_none_fits(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DVI_CACHE", str(tmp_path))
    spec = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2, draft_vocab_size=0))
    with caplog.at_level(logging.INFO, logger="common.model.split"):
        untrained = SplitModel.load(spec)
    assert "no warm start fits" in caplog.text
    trained = stories_split(exit_layer=2)
    g = torch.Generator().manual_seed(0)
    trained.load_adapter_state({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in trained.adapter_state().items()}, 7)
    target = installed_warm_start_dir(trained.fingerprint, 2)
    trained.save_adapter(target)

    loaded = SplitModel.load(spec)
    assert loaded.weight_version == 0
    for name, value in trained.adapter_state().items():
        assert torch.equal(loaded.adapter_state()[name], value)
    assert not torch.equal(untrained.adapter_state()[name], value)
    assert SplitModel.load(ModelSpec(model=str(STORIES), drafter=spec.drafter, warm_start=False)).adapter_state()[name].equal(untrained.adapter_state()[name])

    caplog.clear()
    other = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2, full_rank_exit_layer=False, draft_vocab_size=0))
    with caplog.at_level(logging.INFO, logger="common.model.split"):
        SplitModel.load(other)  # the installed warm start is for a full-rank exit layer: skipped, untrained
    assert "does not fit this drafter" in caplog.text and "no warm start fits" in caplog.text


def test_the_corpus_cache_regenerates_only_prompts_it_has_not_seen(tmp_path, monkeypatch):
    import learner.warmstart as warmstart

    calls = []

    class Counting(warmstart.SpeculativeDecoder):
        def start(self, prompt, *args, **kwargs):  # every generation starts here, alone or in a batch
            calls.append(list(prompt))
            return super().start(prompt, *args, **kwargs)

    monkeypatch.setattr(warmstart, "SpeculativeDecoder", Counting)
    split = stories_split(exit_layer=2)
    a, b, c = [encode_prompt(split.tokenizer, p.text) for p in load_prompts(SEEDS)[:3]]
    greedy = WarmStartConfig(max_new_tokens=6, **GREEDY)
    first, _ = generate_corpus(split, [a, b], greedy, tmp_path)
    assert calls == [a, b]
    again, seconds = generate_corpus(split, [c, a, b], greedy, tmp_path)  # a grown, reordered seed file
    assert calls == [a, b, c] and seconds > 0
    assert [t.tokens.tolist() for t in again[1:]] == [t.tokens.tolist() for t in first]
    sampled = WarmStartConfig(max_new_tokens=6, temperature=1.0, samples_per_prompt=2)
    generate_corpus(split, [a], sampled, tmp_path)  # other settings: new keys beside the greedy ones
    assert len(calls) == 5 and len(list(tmp_path.glob("*.msgpack"))) == 5
    generate_corpus(split, [a, b, c], greedy, tmp_path)
    assert len(calls) == 5


def test_a_cosine_schedule_decays_the_warm_starts_rates_to_zero_and_a_constant_one_keeps_them():
    split = stories_split(exit_layer=2)
    seeds = interleave_categories(load_prompts(SEEDS))[:4]
    corpus, _ = generate_corpus(split, [encode_prompt(split.tokenizer, p.text) for p in seeds], WarmStartConfig(max_new_tokens=8, **GREEDY))
    rates = {}
    for kind in ("constant", "cosine"):
        config = WarmStartConfig(max_new_tokens=8, epochs=2, chunks=2, lr_schedule=kind, **GREEDY)
        config = replace(config, learner=replace(config.learner, batch_tokens=16))  # every planned step is taken
        learner, points = train_warm_start(split.sibling(split.drafter_config), corpus, [], config)
        assert points[-1].steps == sum(max(1, -(-2 * sum(t.num_scored for t in corpus[a:b]) // 16)) for a, b in ((0, 2), (2, 4)))
        rates[kind] = [(g["lr"], g["initial_lr"]) for g in learner.optimizer.param_groups]
    assert all(lr == initial > 0 for lr, initial in rates["constant"])
    assert all(abs(lr) < 1e-12 < initial for lr, initial in rates["cosine"])


def test_corpus_workers_make_the_same_generations_as_one_process_and_fill_the_same_cache(tmp_path):
    split = stories_split(exit_layer=2)
    spec = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2, draft_vocab_size=0), warm_start=False)
    prompts = [encode_prompt(split.tokenizer, p.text) for p in load_prompts(SEEDS)[:3]]
    sampled = WarmStartConfig(max_new_tokens=8, temperature=1.0, samples_per_prompt=2)
    alone, _ = generate_corpus(split, prompts, sampled)
    progress = []
    pooled, seconds = generate_corpus(split, prompts, sampled, tmp_path, workers=2, spec=spec,
                                      on_request=lambda done, total: progress.append((done, total)))
    assert [t.tokens.tolist() for t in pooled] == [t.tokens.tolist() for t in alone]  # seeded by key, not by process
    assert all(torch.equal(p.verified_topk_ids, a.verified_topk_ids) for p, a in zip(pooled, alone))
    # fp16 records: one torch thread per worker against the test process's threads may differ in the last bit
    assert torch.allclose(torch.cat([t.hidden.flatten() for t in pooled]), torch.cat([t.hidden.flatten() for t in alone]), atol=1e-2, rtol=1e-2)
    assert progress[-1] == (6, 6) and len(progress) == 6 and seconds > 0
    cached, _ = generate_corpus(split, prompts, sampled, tmp_path)  # the workers' generations were cached
    assert len(list(tmp_path.glob("*.msgpack"))) == 6 and [t.tokens.tolist() for t in cached] == [t.tokens.tolist() for t in alone]
    try:
        generate_corpus(split, prompts, sampled, workers=2)
    except ValueError as exc:
        assert "ModelSpec" in str(exc)
    else:
        raise AssertionError("workers without a spec must be refused")


def test_warmstart_refuses_zero_workers_before_loading_anything(capsys, tmp_path):
    """`dvi warmstart --workers 0`: one clear line, exit code 2, nothing written."""
    from dvi.cli import main

    code = main(["warmstart", "--model", str(STORIES), "--out", str(tmp_path / "out"), "--workers", "0", "--no-install"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers" in err and "must be >= 1" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
