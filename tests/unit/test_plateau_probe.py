"""benchmarks/plateau_probe.py: the second exit layer starts as the identity and trains."""

import importlib.util
from pathlib import Path

import torch

from common.core.config import DrafterConfig
from common.model.split import SplitModel
from tests.tiny_models import randomize_adapter, tiny_llama

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "plateau_probe.py"
_spec = importlib.util.spec_from_file_location("plateau_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_second_exit_layer_starts_as_the_identity_and_is_in_the_path():
    split = SplitModel(tiny_llama(seed=5, layers=4), None, DrafterConfig(exit_layer=2, lora_rank=4, lora_alpha=8),
                       "tiny-llama-5")
    randomize_adapter(split, seed=0, scale=0.05)
    hidden, at = torch.randn(6, split.hidden_size), torch.arange(6)
    before = split.drafter_logits(hidden, at)
    first = split._head.exit_block()

    new = probe.add_second_layer(split)
    trainable = {id(p) for p in split.trainable_parameters()}
    assert new and all(id(p) in trainable for p in new)
    assert torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-6)  # zeroed outputs: the identity
    with torch.no_grad():
        split._head.exit_block().second.self_attn.o_proj.weight.normal_()
    assert not torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-3)  # it runs after the exit layer

    probe.remove_second_layer(split)
    assert split._head.exit_block() is first
    assert torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-6)
