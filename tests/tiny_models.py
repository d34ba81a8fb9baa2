"""Builders for the models tests run on: tiny random Llamas and the real stories260K."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.core.config import DrafterConfig
from common.model.split import SplitModel
from dvi.data import SPEC_BENCH_DEV

REPO_ROOT = Path(__file__).resolve().parents[1]
STORIES = REPO_ROOT / "tests" / "models" / "stories260K"  # shipped with the tests (MIT, ~1 MB)
SPEC_BENCH = SPEC_BENCH_DEV


def tiny_llama(seed: int = 0, layers: int = 4, vocab: int = 96, hidden: int = 32, dtype=torch.float32) -> LlamaForCausalLM:
    """A random Llama small enough to decode thousands of tokens a second; frozen, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def tiny_split(seed: int = 0, exit_layer: int = 2, engine: str = "fast", draft_vocab_size: int = 0, **kwargs) -> SplitModel:
    model = tiny_llama(seed, **kwargs)
    drafter = DrafterConfig(exit_layer=exit_layer, lora_rank=4, lora_alpha=8, draft_vocab_size=draft_vocab_size)
    return SplitModel(model, None, drafter, f"tiny-llama-{seed}", engine=engine)


def stories_split(exit_layer: int = 2, engine: str = "fast", draft_vocab_size: int = 0,
                  exit_init_layer: int | None = None) -> SplitModel:
    """The real 5-layer stories260K Llama split at `exit_layer`, its exit head untrained (no warm
    start is looked up: tests do not depend on the user's cache); `exit_init_layer` as in DrafterConfig."""
    from common.core.config import ModelSpec

    drafter = DrafterConfig(exit_layer=exit_layer, draft_vocab_size=draft_vocab_size, exit_init_layer=exit_init_layer)
    return SplitModel.load(ModelSpec(model=str(STORIES), drafter=drafter, engine=engine, warm_start=False))


def randomize_adapter(split: SplitModel, seed: int, scale: float = 0.5) -> None:
    """Give every LoRA tensor random values (lora_B too, so the drafter really changes)."""
    from common.model.split import DRAFT_VOCAB_KEY

    g = torch.Generator().manual_seed(seed)
    state = {k: v if k == DRAFT_VOCAB_KEY else torch.randn(v.shape, generator=g) * scale for k, v in split.adapter_state().items()}
    split.load_adapter_state(state, version=split.weight_version + 1)


def quantize_native(model, kind: str = "Q4_1") -> dict:
    """Quantise every decoder-layer projection of `model` whose input size is a multiple of 32 to
    the GGUF type `kind` (Q4_1 or Q8_0) with gguf's own quantiser, write the dequantised values
    back into the model (so the HF forward uses the same weights) and return the native matrices
    by HF module name, as `common.model.loading.load_native_weights` returns them for a GGUF file."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from common.model.engine.native_weights import q4_1_matrix, q8_0_matrix

    gguf_type = getattr(GGMLQuantizationType, kind)
    decode = {"Q4_1": q4_1_matrix, "Q8_0": q8_0_matrix}[kind]
    native = {}
    for name, module in model.named_modules():
        if ".layers." not in name or not isinstance(module, torch.nn.Linear) or module.in_features % 32:
            continue
        blocks = quants.quantize(module.weight.detach().numpy().astype(np.float32), gguf_type)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(quants.dequantize(blocks, gguf_type)))
        native[name] = decode(blocks, module.out_features, module.in_features)
    return native


def native_tiny_split(seed: int = 0, exit_layer: int = 2, kind: str = "Q4_1", **kwargs) -> SplitModel:
    """A tiny random Llama (hidden 64: every projection quantisable) quantised in-test to `kind`,
    split with its native matrices on the fast engine."""
    kwargs.setdefault("hidden", 64)
    model = tiny_llama(seed, **kwargs)
    native = quantize_native(model, kind)
    drafter = DrafterConfig(exit_layer=exit_layer, lora_rank=4, lora_alpha=8, draft_vocab_size=0)
    return SplitModel(model, None, drafter, f"tiny-llama-{seed}-{kind}", native=native)
