"""Greedy speculative decoding is token-identical to `model.generate(do_sample=False)`."""

import pytest
import torch

from common.core.config import DecodeConfig
from common.model.split import cached_kv, crop_cache
from common.core.prompts import load_prompts
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import head_only
from tests.tiny_models import SPEC_BENCH, randomize_adapter, stories_split, tiny_split

CONFIGS = {"head_only": head_only, "defaults": DecodeConfig}  # the exit-head paths, and the product default


def hf_greedy(model, ids, max_new_tokens):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=model.generation_config.eos_token_id, pad_token_id=0,
    )
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_tiny_random_llama_matches_hf_greedy(seed, exit_layer, engine, config):
    split = tiny_split(seed=seed, exit_layer=exit_layer, engine=engine)
    assert split.engine == engine
    if seed:  # a trained-looking drafter exercises long accepted runs and rejections alike
        randomize_adapter(split, seed, scale=0.3)
    decoder = SpeculativeDecoder(split)
    gen = torch.Generator().manual_seed(seed)
    for prompt_len in (1, 2, 7, 19):
        ids = torch.randint(3, split.vocab_size, (prompt_len,), generator=gen).tolist()
        reference = hf_greedy(split.model, ids, 40)
        for gamma in (0, 1, 2, 4, 7):
            result = decoder.generate(ids, CONFIGS[config](gamma=gamma, max_new_tokens=40))
            assert result.token_ids == reference, (prompt_len, gamma)


def test_gamma_zero_is_plain_autoregressive():
    split = tiny_split(seed=4, exit_layer=2)
    result = SpeculativeDecoder(split).generate([5, 9, 13], DecodeConfig.autoregressive(30))
    assert result.verifier_passes == len(result.token_ids) == 30
    assert result.drafted == 0 and result.tau == 1.0
    assert result.token_ids == hf_greedy(split.model, [5, 9, 13], 30)


def test_stories260k_matches_hf_on_twenty_prompts():
    split = stories_split(exit_layer=3)  # acceptance ~0.7 here: long accepted runs and rejections
    tok = split.tokenizer
    openings = [
        "Once upon a time", "The little dog", "Tom and Sue", "One day, a bird", "The sun was",
        "Lily wanted to", "There was a big", "Mom said", "The cat was sad because", "Ben had a red",
        "In the park", "A little girl named", "The boy saw", "It was a sunny day", "The frog",
        "Sam liked to", "The old tree", "Anna and her friend", "The toy car", "At night, the moon",
        "Once",
    ]
    decoder = SpeculativeDecoder(split)
    total_accepted = 0
    for text in openings:
        ids = tok(text)["input_ids"]
        reference = hf_greedy(split.model, ids, 48)
        for gamma in (1, 4, 6):
            result = decoder.generate(ids, head_only(gamma=gamma, max_new_tokens=48))
            assert decoder.generate(ids, DecodeConfig(gamma=gamma, max_new_tokens=48)).token_ids == reference
            assert result.token_ids == reference, (text, gamma)
            total_accepted += result.accepted
    assert total_accepted > 0  # the accept path really ran


def test_eos_stops_like_hf():
    from common.core.config import DrafterConfig
    from common.model.split import SplitModel
    from tests.tiny_models import tiny_llama

    model = tiny_llama(seed=6)
    ids = [7, 3, 11]
    free_run = hf_greedy(model, ids, 40)
    eos = free_run[12]  # a token greedy decoding is known to reach: make it the EOS
    model.generation_config.eos_token_id = eos
    split = SplitModel(model, None, DrafterConfig(exit_layer=2, lora_rank=4), "tiny-eos")
    randomize_adapter(split, 6, scale=0.3)
    reference = hf_greedy(model, ids, 40)
    assert reference[-1] == eos and len(reference) <= 13
    for gamma in (0, 3, 6):
        result = SpeculativeDecoder(split).generate(ids, head_only(gamma=gamma, max_new_tokens=40))
        assert SpeculativeDecoder(split).generate(ids, DecodeConfig(gamma=gamma, max_new_tokens=40)).token_ids == reference
        assert result.token_ids == reference and result.finished_by_eos


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_kv_cache_holds_exactly_the_committed_prefix_after_rejections(engine):
    split = tiny_split(seed=5, exit_layer=2, engine=engine)
    assert split.engine == engine
    randomize_adapter(split, 5, scale=0.3)
    decoder = SpeculativeDecoder(split)
    state = decoder.start([4, 8, 15, 16, 23], head_only(gamma=4, max_new_tokens=40))
    rejections = 0
    while not state.done:
        drafted_before = state.result.drafted
        accepted_before = state.result.accepted
        decoder.step(state)
        rejections += (state.result.drafted - drafted_before) > (state.result.accepted - accepted_before)
        n = len(state.tokens)
        for layer in range(split.num_layers):
            assert state.cache.get_seq_length(layer) == n - 1
        assert state.exit_cache.get_seq_length(0) <= n - 1
        assert len(state.hk_committed) == n - 1
        # contents: a fresh prefill of the committed prefix gives the same keys and values
        fresh = split.new_cache()
        pos = torch.arange(n - 1)[None]
        split.deep(split.shallow(torch.tensor([state.tokens[:-1]]), pos, fresh), pos, fresh, logits=False)
        for layer in range(split.num_layers):
            for held, refilled in zip(cached_kv(state.cache, layer), cached_kv(fresh, layer)):
                assert held.shape == refilled.shape
                assert torch.allclose(held, refilled, atol=1e-5)
    assert rejections > 0


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_crop_cache_keeps_a_prefix(engine):
    split = tiny_split(seed=0, exit_layer=2, engine=engine)
    cache = split.new_cache()
    pos = torch.arange(6)[None]
    split.deep(split.shallow(torch.tensor([[3, 4, 5, 6, 7, 8]]), pos, cache), pos, cache, logits=False)
    before = cached_kv(cache, 0)[0].clone()
    crop_cache(cache, 4)
    assert cache.get_seq_length(0) == 4 and cache.get_seq_length(3) == 4
    assert torch.equal(cached_kv(cache, 0)[0], before[:, :4])
    crop_cache(cache, 10)  # longer than held: unchanged
    assert cache.get_seq_length(0) == 4


@pytest.mark.slow
def test_smollm2_matches_hf_on_spec_bench_prompts(smollm2_split):
    """Speculative decoding on the native weights with fp32 activations equals HF greedy on the
    dequantised model. The q8 kernel (8-bit activations, what the probe picks where it runs) is a
    different function of the same weights, as llama.cpp's is: it is checked against our own AR
    on it (test_native_engine.py), not against HF."""
    from common.core.prompts import encode_prompt

    split = smollm2_split
    decoder = SpeculativeDecoder(split)
    with split._fast.fp32_activations():
        for prompt in load_prompts(SPEC_BENCH, limit=40)[::13]:  # 4 prompts from different categories
            ids = encode_prompt(split.tokenizer, prompt.text)
            reference = hf_greedy(split.model, ids, 24)
            result = decoder.generate(ids, DecodeConfig(gamma=4, max_new_tokens=24))
            assert result.token_ids == reference, prompt.question_id
