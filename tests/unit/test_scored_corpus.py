"""Corpus text made in batches: on the CPU engine many generations per verifier pass
(`SpeculativeDecoder.generate_batch`), elsewhere HF batched sampling (common/decoding/batched_sampling.py)
and its teacher-forced record (common/decoding/teacher.py); and the seed instructions the model
writes itself; on the real stories260K."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.core.config import DecodeConfig
from common.core.prompts import encode_prompt, load_prompts
from common.decoding.batched_sampling import sample_continuations
from common.decoding.speculative import SpeculativeDecoder
from common.decoding.teacher import scored_trajectory
from dvi.commands.warmstart import SEEDS
from learner.warmstart import WarmStartConfig, batches_on_decoder, generate_corpus
from tests.tiny_models import stories_split


@pytest.fixture(scope="module")
def split():
    return stories_split(exit_layer=2)


@pytest.fixture(scope="module")
def prompts(split):
    return [encode_prompt(split.tokenizer, p.text) for p in load_prompts(SEEDS)[:4]]


def test_a_scored_trajectory_matches_what_the_decoder_records_for_the_same_text(split, prompts):
    decode = DecodeConfig(gamma=0, max_new_tokens=12, record_trajectories=True, record_topk=8, record_prompt_positions=1_000_000)
    decoded = SpeculativeDecoder(split).generate(prompts[0], decode).trajectory
    scored = scored_trajectory(split, decoded.tokens.tolist(), decoded.prompt_length, 8, "scored", 0.0).validate()
    assert scored.tokens.tolist() == decoded.tokens.tolist() and scored.num_drafted == 0
    order = decoded.verified_position.argsort()
    assert scored.verified_position.tolist() == list(range(scored.num_context)) == decoded.verified_position[order].tolist()
    assert torch.allclose(scored.hidden.float(), decoded.hidden.float(), atol=2e-2)
    assert torch.equal(scored.verified_topk_ids[:, 0], decoded.verified_topk_ids[order][:, 0])
    assert torch.allclose(scored.verified_topk_logprobs, decoded.verified_topk_logprobs[order], atol=1e-3)
    # greedy text: the verifier's top-1 after every generated position is the next token
    after = scored.verified_topk_ids[scored.prompt_length - 1 :, 0]
    assert after.tolist() == scored.tokens[scored.prompt_length :].tolist()


def test_scored_trajectory_refuses_bad_input(split):
    for tokens, prompt_length, match in (([5], 1, "at least 2"), ([5, 6], 3, "prompt_length"), ([5, 10**6], 1, "outside"), ([5, -1], 1, "outside")):
        with pytest.raises(ValueError, match=match):
            scored_trajectory(split, tokens, prompt_length, 4, "bad", 0.0)


def test_batched_greedy_sampling_is_each_prompts_own_greedy_decoding(split, prompts):
    batch = [prompts[0], prompts[1][:5], prompts[2]]  # unequal lengths: left padding must not change a row
    got = sample_continuations(split.model, batch, 10, 0.0, split.eos_token_ids, split.tokenizer.pad_token_id or 0, seed=0)
    decoder = SpeculativeDecoder(split)
    for prompt, continuation in zip(batch, got):
        assert continuation == decoder.generate(prompt, DecodeConfig(gamma=0, max_new_tokens=10)).token_ids


def test_batched_sampling_is_seeded_and_stops_each_row_at_its_first_eos(split, prompts):
    sample = lambda seed, eos: sample_continuations(split.model, prompts, 16, 1.0, eos, 0, seed=seed)  # noqa: E731
    first = sample(3, split.eos_token_ids)
    assert first == sample(3, split.eos_token_ids) and first != sample(4, split.eos_token_ids)
    assert all(1 <= len(c) <= 16 for c in first)
    common = first[0][2]  # make a token the first row draws an end-of-sequence id: every row stops at its first one
    stopped = sample(3, {common})
    for row, cont in zip(first, stopped):
        end = row.index(common) + 1 if common in row else len(row)
        assert cont == row[:end]
    with pytest.raises(ValueError, match="no empty prompt"):
        sample_continuations(split.model, [prompts[0], []], 4, 1.0, split.eos_token_ids, 0, seed=0)


def test_a_batched_corpus_on_a_cpu_is_each_generation_decoded_alone_whatever_the_batch(split, prompts, tmp_path):
    """On the CPU engine a batch steps its generations together: each is its key-seeded decoding
    with drafting off, so the batch size and the worker processes change nothing, and the cache
    keys differ from the one-at-a-time decoder's (other text)."""
    from common.core.config import DrafterConfig, ModelSpec
    from tests.tiny_models import STORIES

    assert batches_on_decoder(split)
    config = WarmStartConfig(max_new_tokens=8, temperature=1.0, samples_per_prompt=2, batch_size=3)
    alone, seconds = generate_corpus(split, prompts[:3], config, tmp_path / "one")
    assert len(alone) == 6 and seconds > 0 and all(t.validate().num_drafted == 0 for t in alone)
    assert all(t.verified_position.tolist() == list(range(t.num_context)) for t in alone)  # every position distilled
    first = SpeculativeDecoder(split).generate(
        prompts[0], config.batch_decode, generator=torch.Generator().manual_seed(int(alone[0].request_id[10:25], 16)))
    assert alone[0].tokens.tolist() == prompts[0] + first.token_ids
    other_batch, _ = generate_corpus(split, prompts[:3], replace(config, batch_size=2), tmp_path / "two")
    assert [t.tokens.tolist() for t in other_batch] == [t.tokens.tolist() for t in alone]
    spec = ModelSpec(model=str(STORIES), drafter=DrafterConfig(exit_layer=2, draft_vocab_size=0), warm_start=False)
    pooled, _ = generate_corpus(split, prompts[:3], config, tmp_path / "pool", workers=2, spec=spec)
    assert [t.tokens.tolist() for t in pooled] == [t.tokens.tolist() for t in alone]
    generate_corpus(split, prompts[:3], replace(config, batch_size=1), tmp_path / "one")
    assert len(list((tmp_path / "one").glob("*.msgpack"))) == 12  # the decoder's keys differ from a batch's
    with pytest.raises(ValueError, match="batch_size"):
        WarmStartConfig(batch_size=0)


def test_a_batched_corpus_elsewhere_is_sampled_together_then_scored(split, prompts, tmp_path, monkeypatch):
    """Where sequences do not step together (an accelerator's HF forward), a batch is sampled in
    one HF `generate` and each row scored by a teacher-forced pass, under keys naming the batch size."""
    monkeypatch.setattr("learner.warmstart.batches_on_decoder", lambda split: False)
    config = WarmStartConfig(max_new_tokens=8, temperature=1.0, samples_per_prompt=2, batch_size=3)
    corpus, _ = generate_corpus(split, prompts[:3], config, tmp_path / "hf")
    assert len(corpus) == 6 and all(t.validate().num_drafted == 0 for t in corpus)
    assert all(t.verified_position.tolist() == list(range(t.num_context)) for t in corpus)
    again, _ = generate_corpus(split, prompts[:3], config, tmp_path / "hf-again")
    assert [t.tokens.tolist() for t in again] == [t.tokens.tolist() for t in corpus]  # batches seeded by their keys
    assert config.corpus_settings(False)["batch_size"] == 3 and "batch_size" not in config.corpus_settings(True)


def test_the_model_writes_distinct_seeded_seed_instructions_that_end_by_themselves():
    from learner.self_seeds import self_instruct_prompts, user_turn_prefix

    split = stories_split(exit_layer=2)  # its own copy: the chat template below must not leak
    with pytest.raises(ValueError, match="chat template"):
        user_turn_prefix(split.tokenizer)
    split.tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert split.tokenizer.decode(user_turn_prefix(split.tokenizer)).strip() == "user:"
    period = split.tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    split.eos_token_ids = {*split.eos_token_ids, period}  # a request "ends" at its first sentence
    first = self_instruct_prompts(split, 5, seed=1, max_tokens=24, min_tokens=3)
    assert first == self_instruct_prompts(split, 5, seed=1, max_tokens=24, min_tokens=3)
    assert 1 <= len(first) <= 5 and len(set(first)) == len(first)
    assert all(text.endswith(".") and text.count(".") == 1 for text in first)  # cut at its own end, kept only then
    assert first != self_instruct_prompts(split, 5, seed=2, max_tokens=24, min_tokens=3)
    assert self_instruct_prompts(split, 3, seed=1, max_tokens=2, min_tokens=3) == []  # too short to end: none kept
    batched = self_instruct_prompts(split, 5, seed=1, max_tokens=24, min_tokens=3, rows=4)  # drafting off: other text
    assert batched == self_instruct_prompts(split, 5, seed=1, max_tokens=24, min_tokens=3, rows=2)  # whatever the rows
    assert 1 <= len(batched) <= 5 and all(text.endswith(".") and text.count(".") == 1 for text in batched)
    with pytest.raises(ValueError, match="rows"):
        self_instruct_prompts(split, 2, rows=0)


def test_a_model_without_a_chat_template_warms_up_on_the_shipped_seeds_only(tmp_path, capsys):
    from dvi.commands.warmstart import _self_seeds

    split = stories_split(exit_layer=2)  # no chat template: the default self_seeds cannot apply
    assert _self_seeds(split, WarmStartConfig(), tmp_path, tmp_path / "corpus", 1, None) == []
    assert "no chat template" in capsys.readouterr().out and not (tmp_path / "self_seeds.jsonl").exists()


def _chat_stories(tmp_path):
    """A copy of stories260K with a chat template whose requests end at their first sentence."""
    import json
    import shutil

    from tests.tiny_models import STORIES

    model = tmp_path / "chat-stories"
    shutil.copytree(STORIES, model)
    tok = json.loads((model / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(tok))
    from transformers import AutoTokenizer

    period = AutoTokenizer.from_pretrained(model)(".", add_special_tokens=False)["input_ids"][-1]
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, period]
    (model / "generation_config.json").write_text(json.dumps(gen))
    return model


def test_seed_instructions_are_the_same_from_worker_processes_and_from_the_cache(tmp_path, monkeypatch):
    from common.core.config import DrafterConfig, ModelSpec
    from common.model.split import SplitModel
    import learner.self_seeds as self_seeds

    spec = ModelSpec(model=str(_chat_stories(tmp_path)), drafter=DrafterConfig(exit_layer=2, draft_vocab_size=0), warm_start=False)
    split = SplitModel.load(spec)
    alone = self_seeds.self_instruct_prompts(split, 6, seed=3, max_tokens=24, min_tokens=3)
    assert len(alone) >= 2 and all(text.endswith(".") for text in alone)
    pooled = self_seeds.self_instruct_prompts(split, 6, seed=3, max_tokens=24, min_tokens=3, workers=2, spec=spec,
                                              cache_dir=tmp_path / "cache")
    assert pooled == alone

    ran: list[int] = []
    real = self_seeds.attempt_requests
    monkeypatch.setattr(self_seeds, "attempt_requests", lambda s, attempts, *a: ran.extend(attempts) or real(s, attempts, *a))
    cached = self_seeds.self_instruct_prompts(split, 6, seed=3, max_tokens=24, min_tokens=3, cache_dir=tmp_path / "cache")
    assert cached == alone and ran == []  # every attempt came from the cache
    (cache_file,) = (tmp_path / "cache").glob("self_seeds-*.jsonl")
    lines = cache_file.read_text().splitlines()
    cache_file.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:5])  # a write cut short: that attempt runs again
    more = self_seeds.self_instruct_prompts(split, 8, seed=3, max_tokens=24, min_tokens=3, cache_dir=tmp_path / "cache")
    assert ran and min(ran) == len(lines) - 1  # only the cut attempt and new ones ran
    assert more == self_seeds.self_instruct_prompts(split, 8, seed=3, max_tokens=24, min_tokens=3)
    assert more[: len(alone)] == alone
    with pytest.raises(ValueError, match="ModelSpec"):
        self_seeds.self_instruct_prompts(split, 2, workers=2)


def test_the_record_names_the_shipped_seed_file_the_same_on_every_machine(tmp_path):
    from dvi.commands.warmstart import _seeds_name

    assert _seeds_name(SEEDS) == "dvi/data/warmstart_seeds.jsonl"
    assert _seeds_name(str(SEEDS)) == "dvi/data/warmstart_seeds.jsonl"
    own = tmp_path / "my_seeds.jsonl"
    assert _seeds_name(str(own)) == str(own)
