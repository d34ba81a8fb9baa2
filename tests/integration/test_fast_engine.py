"""The fast engine (packed weights, static cache, merged exit head) computes what the HF layers do."""

import pytest
import torch

from common.core.config import DecodeConfig, DrafterConfig
from common.model.split import SplitModel
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import head_only
from tests.tiny_models import randomize_adapter, tiny_llama, tiny_split


def _pieces(split, ids):
    """(verifier logits of the whole chunk, drafter logits of its last position, then of one more token)."""
    pos = torch.arange(ids.shape[1])[None]
    cache, exit_cache = split.new_cache(), split.new_exit_cache()
    with torch.no_grad():
        h = split.shallow(ids, pos, cache)
        verifier = split.deep(h, pos, cache)
        drafter = split.draft(h, pos, exit_cache)
        nxt, at = torch.tensor([[7]]), torch.tensor([[ids.shape[1]]])
        step = split.draft(split.shallow(nxt, at, cache), at, exit_cache)
    return verifier, drafter, step


@pytest.mark.parametrize("draft_vocab_size", [0, 40])
def test_fast_engine_equals_hf_layers_with_a_trained_looking_adapter(draft_vocab_size):
    fast = tiny_split(seed=3, exit_layer=2, engine="fast", draft_vocab_size=draft_vocab_size)
    hf = tiny_split(seed=3, exit_layer=2, engine="hf", draft_vocab_size=draft_vocab_size)
    assert (fast.engine, hf.engine) == ("fast", "hf")
    randomize_adapter(fast, 9, scale=0.5)
    hf.load_adapter_state(fast.adapter_state(), version=fast.weight_version)
    ids = torch.tensor([[5, 17, 33, 2, 9, 41, 11]])
    for mine, theirs in zip(_pieces(fast, ids), _pieces(hf, ids)):
        assert mine.shape == theirs.shape
        assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()
    expected = fast.vocab_size if not draft_vocab_size else draft_vocab_size
    assert _pieces(fast, ids)[1].shape == (expected,)


def test_hot_swap_and_in_place_training_reach_the_merged_head():
    split = tiny_split(seed=4, exit_layer=2)
    ids = torch.tensor([[3, 4, 5, 6]])
    before = _pieces(split, ids)[1]
    randomize_adapter(split, 1, scale=0.5)  # load_adapter_state: the merged copy is rebuilt
    swapped = _pieces(split, ids)[1]
    assert not torch.allclose(before, swapped, atol=1e-3)
    with torch.no_grad():  # an optimiser step changes LoRA tensors in place ...
        for p in split.trainable_parameters():
            p.add_(0.3)
    assert torch.allclose(_pieces(split, ids)[1], swapped)  # ... unseen until the split is told
    split.adapter_changed()
    assert not torch.allclose(_pieces(split, ids)[1], swapped, atol=1e-3)


def test_unsupported_architecture_decodes_through_the_hf_layers():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = Qwen3ForCausalLM(config).eval().requires_grad_(False)
    split = SplitModel(model, None, DrafterConfig(exit_layer=1, lora_rank=4), "tiny-qwen3")
    assert split.engine == "hf"  # q_norm / k_norm: the fast engine does not model them
    result = SpeculativeDecoder(split).generate([3, 5, 7], DecodeConfig(gamma=3, max_new_tokens=12))
    reference = model.generate(torch.tensor([[3, 5, 7]]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    assert result.token_ids == reference[: len(result.token_ids)]


def test_draft_vocabulary_restricts_every_draft_and_stays_lossless():
    split = tiny_split(seed=6, exit_layer=2, draft_vocab_size=24)
    randomize_adapter(split, 6, scale=0.3)
    split.set_draft_vocab(torch.arange(40, 64))
    decoder = SpeculativeDecoder(split)
    prompt = [9, 41, 12, 50]
    result = decoder.generate(prompt, head_only(gamma=4, max_new_tokens=40, record_trajectories=True))
    assert result.drafted > 0
    assert all(40 <= t < 64 for t in result.trajectory.token.tolist())
    reference = split.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                                     eos_token_id=split.model.generation_config.eos_token_id)[0, 4:].tolist()
    assert result.token_ids == reference


def test_adapter_round_trip_carries_the_draft_vocabulary(tmp_path):
    from common.core.errors import AdapterError

    split = tiny_split(seed=2, exit_layer=2, draft_vocab_size=16)
    split.set_draft_vocab(torch.arange(20, 36))
    randomize_adapter(split, 2)
    split.save_adapter(tmp_path / "a")
    other = tiny_split(seed=2, exit_layer=2, draft_vocab_size=16)
    other.load_adapter(tmp_path / "a")
    assert other.draft_vocab.tolist() == list(range(20, 36))
    full = tiny_split(seed=2, exit_layer=2)
    with pytest.raises(AdapterError, match="drafts from 16 tokens"):
        full.load_adapter(tmp_path / "a")
    bad = split.adapter_state()
    bad["dvi.draft_vocab"] = torch.arange(8)
    with pytest.raises(AdapterError, match="holds 8 ids"):
        other.load_adapter_state(bad, version=3)
    assert other.draft_vocab.tolist() == list(range(20, 36))


def test_a_draft_vocabulary_as_large_as_the_model_means_the_full_one():
    split = SplitModel(tiny_llama(seed=0), None, DrafterConfig(exit_layer=2, draft_vocab_size=1000), "tiny")
    assert split.draft_vocab_size == 0 and split.draft_vocab.tolist() == list(range(split.vocab_size))
    assert "dvi.draft_vocab" not in split.adapter_state()
