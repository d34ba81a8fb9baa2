"""The exit head's shape: initialised from layer k (the layer right after the cut), its private
copy trained at full rank (peft modules_to_save) next to a LoRA on the LM head as the drafter sees
it; every trainable tensor travels with the adapter (hot-swap, safetensors save/load) and none
of them can change the verifier."""

from __future__ import annotations

import pytest
import torch

from common.core.config import DrafterConfig
from common.core.errors import AdapterError
from common.model.split import SplitModel
from tests.tiny_models import randomize_adapter, tiny_llama


def split_with(engine: str = "fast", **drafter) -> SplitModel:
    model = tiny_llama(seed=5, layers=4)
    config = DrafterConfig(**{"exit_layer": 2, "lora_rank": 4, "lora_alpha": 8, **drafter})
    return SplitModel(model, None, config, "tiny-llama-5", engine=engine)


def block_weights(split: SplitModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in split._head.exit_block().named_parameters() if "lora_" not in n}


def layer_weights(split: SplitModel, index: int) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in split.layers[index].named_parameters()}


def test_exit_layer_starts_as_a_copy_of_layer_k():
    split = split_with()
    assert split.drafter_config.init_layer_for(split.num_layers) == split.exit_layer == 2
    mine, theirs = block_weights(split), layer_weights(split, 2)
    assert mine.keys() == theirs.keys() and mine
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    last = layer_weights(split, 3)
    assert not all(torch.equal(mine[n], last[n]) for n in mine)
    assert split._head.exit_block() is not split.layers[2]  # a private copy, not the verifier's layer


def test_exit_init_layer_picks_another_layer():
    split = split_with(exit_init_layer=3)
    mine, last = block_weights(split), layer_weights(split, 3)
    assert all(torch.equal(mine[n], last[n]) for n in mine)


def test_full_rank_trains_every_exit_layer_weight_and_a_lora_on_the_lm_head():
    split = split_with()
    names = set(split.named_trainable_parameters())
    block = {n for n in names if ".modules_to_save." in n}
    assert {n.rsplit(".modules_to_save.default.", 1)[1] for n in block} == set(layer_weights(split, 2))
    assert names - block == {n for n in names if "lm_head.lora_" in n} and names - block
    lora = split_with(full_rank_exit_layer=False)
    assert all("lora_" in n for n in lora.named_trainable_parameters())
    assert any("block.self_attn" in n for n in lora.named_trainable_parameters())


def test_full_rank_needs_a_lora_target():
    with pytest.raises(ValueError, match="adapt_lm_head"):
        DrafterConfig(adapt_lm_head=False)
    DrafterConfig(adapt_lm_head=False, full_rank_exit_layer=False)


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_hot_swap_and_save_load_carry_the_full_rank_layer(tmp_path, engine):
    split = split_with(engine=engine)
    ids = torch.tensor([[3, 9, 27, 81, 50]])
    pos = torch.arange(5)[None]

    def both(s):
        cache, exit_cache = s.new_cache(), s.new_exit_cache()
        h = s.shallow(ids, pos, cache)
        return s.deep(h, pos, cache).clone(), s.draft(h, pos, exit_cache).clone()

    verifier0, drafter0 = both(split)
    randomize_adapter(split, seed=2, scale=0.05)  # hot-swap: every trainable tensor, the block's full weights too
    verifier1, drafter1 = both(split)
    assert torch.equal(verifier0, verifier1) and not torch.allclose(drafter0, drafter1, atol=1e-3)
    state = split.adapter_state()
    assert any(".modules_to_save." in n or "block.self_attn" in n for n in state)

    split.save_adapter(tmp_path / "a")
    other = split_with(engine=engine)
    other.load_adapter(tmp_path / "a")
    assert torch.allclose(both(other)[1], drafter1, atol=1e-5)
    lora_only = split_with(engine=engine, full_rank_exit_layer=False)
    with pytest.raises(AdapterError):
        lora_only.load_adapter(tmp_path / "a")


def test_a_sibling_drafter_shares_the_frozen_base_and_starts_untrained():
    from common.core.config import DrafterConfig
    from tests.tiny_models import randomize_adapter, tiny_split

    split = tiny_split(seed=0, exit_layer=2)
    untrained = split.adapter_state()
    randomize_adapter(split, seed=1)
    other = split.sibling(DrafterConfig(exit_layer=1, lora_rank=4, lora_alpha=8))
    assert other.model is split.model and other.native is split.native and other.engine == split.engine
    assert other.exit_layer == 1 and split.exit_layer == 2
    same = split.sibling(split.drafter_config).adapter_state()  # untrained, not the randomized copy:
    copies = [k for k in untrained if ".block." in k]  # the full-rank copy of layer k, as built
    zeros = [k for k in untrained if "lora_B" in k]  # LoRA B starts at zero (A is drawn at random)
    assert copies and zeros
    assert all(torch.equal(same[k], untrained[k]) for k in copies)
    assert all(not same[k].any() for k in zeros)
    assert split.sibling(split.drafter_config, "hf").engine == "hf"
