"""Drafting from the context keeps decoding lossless and feeds the learner extra verified rows."""

from dataclasses import replace

import pytest
import torch

from common.core.config import DecodeConfig
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import matches_model_distribution, sample_two_tokens
from tests.tiny_models import randomize_adapter, stories_split, tiny_split


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         eos_token_id=model.generation_config.eos_token_id)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("gamma", [0, 3])
def test_stories260k_with_context_drafting_matches_hf(gamma):
    split = stories_split(exit_layer=2)
    decoder = SpeculativeDecoder(split)
    lookups = 0
    for text in ("Once upon a time", "Tom and Sue went to the park. Tom and Sue", "The cat sat. The cat"):
        ids = split.tokenizer(text)["input_ids"]
        config = DecodeConfig(gamma=gamma, context_tokens=6, max_new_tokens=60)
        result = decoder.generate(ids, config)
        assert result.token_ids == hf_greedy(split.model, ids, 60), text
        lookups += result.context_drafted
        assert result.context_accepted <= result.context_drafted
    assert lookups > 0


def test_context_blocks_record_verified_rows_not_drafts():
    split = tiny_split(seed=5, exit_layer=2)
    randomize_adapter(split, 5, scale=0.3)
    prompt = [4, 8, 15, 16, 4, 8, 15]
    result = SpeculativeDecoder(split).generate(
        prompt, DecodeConfig(gamma=3, context_tokens=4, max_new_tokens=30, record_trajectories=True, record_topk=5)
    )
    traj = result.trajectory.validate()
    assert result.context_drafted > 0
    assert traj.num_drafted == min(result.drafted, traj.num_drafted) and traj.num_verified > 0
    sequence = prompt + result.token_ids
    assert traj.tokens.tolist() == sequence and traj.prompt_length == len(prompt)
    assert traj.num_context == len(sequence) - 1
    # every position is scored exactly once: by a drafted record or a verified row (the prompt's
    # positions by the prefill, record_prompt_positions >= its length)
    scored = sorted(traj.position.tolist() + traj.verified_position.tolist())
    assert scored == list(range(len(sequence) - 1))
    # greedy: the verifier's top-1 at a verified position is the token committed after it
    for p, ids in zip(traj.verified_position.tolist(), traj.verified_topk_ids):
        if p >= len(prompt) - 1:
            assert int(ids[0]) == sequence[p + 1]


def test_prefill_records_a_sample_of_prompt_positions_with_the_verifiers_targets():
    from common.decoding.speculative import prompt_positions

    assert prompt_positions(10, 0).tolist() == []
    assert prompt_positions(4, 9).tolist() == [0, 1, 2, 3]
    assert prompt_positions(10, 3).tolist() == [0, 4, 9]  # spread evenly, the last one in
    split = tiny_split(seed=5, exit_layer=2)
    prompt = [4, 8, 15, 16, 23, 42, 7, 9, 11, 3, 5]
    decoder = SpeculativeDecoder(split)
    config = DecodeConfig(gamma=2, max_new_tokens=5, record_trajectories=True, record_topk=5, record_prompt_positions=3)
    traj = decoder.generate(prompt, config).trajectory.validate()
    kept = [p for p in traj.verified_position.tolist() if p < len(prompt) - 1]
    assert kept == [0, 4, 9]  # linspace(9, 0, 3) = 9, 4.5, 0; 4.5 rounds to even
    with torch.no_grad():
        logp = torch.log_softmax(split.model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    for row, p in enumerate(traj.verified_position.tolist()[:3]):
        values, ids = torch.topk(logp[p], 5)
        assert torch.equal(traj.verified_topk_ids[row], ids)
        assert torch.allclose(traj.verified_topk_logprobs[row], values, atol=1e-4)
    none = decoder.generate(prompt, replace(config, record_prompt_positions=0)).trajectory
    assert int(none.verified_position.min()) >= len(prompt) - 1


def test_sampling_with_context_drafts_keeps_the_model_distribution():
    split = tiny_split(seed=2, exit_layer=1, vocab=5, hidden=16, layers=3)
    split.eos_token_ids = set()
    prompt = [1, 2, 1]  # the suffix (1,) occurred before: every first block drafts [2, 1] from the context
    config = DecodeConfig(gamma=0, context_tokens=2, temperature=1.0, max_new_tokens=2)
    counts, results = sample_two_tokens(SpeculativeDecoder(split), prompt, config, trials=3000)
    assert sum(r.context_drafted for r in results) >= 3000  # the context path really ran
    assert matches_model_distribution(split.model, prompt, counts) > 1e-3


def test_a_decoder_drafts_from_the_requests_it_served_and_stays_lossless():
    split = stories_split(exit_layer=2)
    decoder = SpeculativeDecoder(split)
    config = DecodeConfig(gamma=0, context_tokens=6, max_new_tokens=40)
    first = split.tokenizer("Once upon a time")["input_ids"]
    again = split.tokenizer("Lily said: Once upon a time")["input_ids"]
    assert decoder.generate(first, config).traffic_drafted == 0  # nothing served before it
    assert len(decoder.traffic) > 0  # it fed the index
    decoder.generate(first, config)  # the index now holds that story twice: confident continuations
    result = decoder.generate(again, config)
    assert result.token_ids == hf_greedy(split.model, again, 40)
    assert 0 < result.traffic_accepted <= result.traffic_drafted <= result.context_drafted
    off = SpeculativeDecoder(split, traffic=decoder.traffic).generate(again, replace(config, traffic_drafting=False))
    assert off.traffic_drafted == 0 and off.token_ids == result.token_ids
    # sampled requests never draft from the traffic (seeded requests stay reproducible), but feed it
    sampling = replace(config, temperature=0.8)
    assert decoder.generate(again, sampling, generator=torch.Generator().manual_seed(0)).traffic_drafted == 0
    fed = SpeculativeDecoder(split)
    fed.generate(again, sampling, generator=torch.Generator().manual_seed(0))
    assert len(fed.traffic) > 0
    # plain AR neither drafts nor feeds it
    fresh = SpeculativeDecoder(split)
    fresh.generate(first, DecodeConfig.autoregressive(20))
    assert len(fresh.traffic) == 0
