"""Lossless on native weights: speculative decoding equals our own AR at the same (GGUF-precision)
weights, token for token (the sampling-distribution test runs on native weights too, in
test_adapter_and_sampling.py); the shipped SmolLM2 file maps onto the fast engine exactly."""

import pytest
import torch

from common.core.config import DecodeConfig
from common.model.engine.packed_linear import NATIVE_KERNELS_ENV, NativeLinear
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import head_only
from tests.tiny_models import native_tiny_split, randomize_adapter

PROMPTS = [[5, 17, 33, 2 + 7, 9, 41], [3, 3, 3, 8, 3, 3, 8], [60, 61, 62, 63, 60, 61], [11]]


def native_layers(split) -> int:
    return sum(isinstance(getattr(layer, role), NativeLinear) for layer in split._fast.layers
               for role in ("qkv", "o", "gate_up", "down"))


@pytest.mark.parametrize("kernels", ["q8", "gguf", "int4", "dense", "gguf,dense", "dense,int4"])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_speculative_equals_autoregressive_on_native_weights(monkeypatch, kernels, kind):
    """Kernel combinations (one row, block; gguf runs dense where no compiled kernel is here), the
    exit head drafting (random LoRA, so it is often wrong) and context drafting: greedy output is
    our AR's at the same native weights."""
    monkeypatch.setenv(NATIVE_KERNELS_ENV, kernels)
    split = native_tiny_split(seed=5, exit_layer=2, kind=kind, vocab=96, layers=4)
    assert split.weights == "native" and split.engine == "fast"
    assert native_layers(split) == 4 * 4
    randomize_adapter(split, 5, scale=0.3)
    split.eos_token_ids = set()
    decoder = SpeculativeDecoder(split)
    drafted = 0
    for prompt in PROMPTS:
        reference = decoder.generate(prompt, DecodeConfig.autoregressive(40)).token_ids
        for config in (DecodeConfig(gamma=4, max_new_tokens=40, confidence_threshold=0.0),
                       head_only(gamma=3, max_new_tokens=40)):
            result = decoder.generate(prompt, config)
            assert result.token_ids == reference, (kernels, kind, prompt)
            drafted += result.verifier_passes < len(result.token_ids)
    assert drafted  # some blocks committed more than one token


def test_native_split_reproduces_the_dequantised_hf_forward():
    """The HF model holds the dequantised values of the same blocks: the native fast engine's
    logits agree with its forward to fp32 rounding (the load-time parity check, made explicit)."""
    split = native_tiny_split(seed=6, exit_layer=2)
    ok, err = split._parity()
    assert ok and err < 1e-4


@pytest.mark.slow
def test_smollm2_native_weights_are_the_gguf_blocks_and_speculation_is_lossless(smollm2_split):
    from common.core.prompts import encode_prompt, load_prompts
    from tests.tiny_models import SPEC_BENCH

    split = smollm2_split
    assert split.weights == "native"
    stack = split._fast
    assert set(stack.native_kernels) == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert isinstance(stack.lm_head, NativeLinear) and stack.lm_head.kind == "Q8_0"
    for native in split.native.values():
        assert native.kind in ("Q4_1", "Q8_0")
    # every native matrix applies exactly the weights transformers dequantised from the same file
    for name, native in list(split.native.items())[:: 7] + [("lm_head", split.native["lm_head"])]:
        assert torch.equal(native.dequantize(), split.model.get_submodule(name).weight), name
    decoder = SpeculativeDecoder(split)
    for prompt in load_prompts(SPEC_BENCH, limit=40)[5::13]:  # 3 prompts from different categories
        ids = encode_prompt(split.tokenizer, prompt.text)
        reference = decoder.generate(ids, DecodeConfig.autoregressive(24)).token_ids
        assert decoder.generate(ids, DecodeConfig(gamma=4, max_new_tokens=24)).token_ids == reference


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["q8", "int4", "gguf", "dense"])
def test_smollm2_runs_native_whichever_kernel_the_probe_picks(monkeypatch, kernels):
    """The load-time parity check accepts every native kernel's summation order on SmolLM2 (the
    probe's choice depends on timing, so a kernel it may pick must never drop the model to the
    dequantised HF layers; torch's int4 kernel once did, 2.3e-3 off against a 1e-3 tolerance)."""
    from common.core.config import DrafterConfig, ModelSpec
    from common.model.split import SplitModel

    monkeypatch.setenv(NATIVE_KERNELS_ENV, kernels)
    split = SplitModel.load(ModelSpec(model="smollm2-135m-instruct", drafter=DrafterConfig(exit_layer=4)))
    assert split.weights == "native" and split.engine == "fast"
    ok, err = split._parity()
    assert ok and err < 1e-2


def test_exit_head_runs_q8_0_where_the_verifier_runs_the_q8_kernel(monkeypatch):
    """With the q8 kernel the merged exit head is quantised to Q8_0 and runs it too (the drafter
    may be approximate: the verifier decides); its drafts stay close to the fp32 head's, and
    speculation stays lossless (test above, `q8`). With fp32-activation kernels it stays fp32."""
    from common.model.engine.packed_linear import NativeKernels, PackedLinear

    logits = {}
    for kernels in ("q8", "gguf"):
        monkeypatch.setenv(NATIVE_KERNELS_ENV, kernels)
        split = native_tiny_split(seed=7, exit_layer=2)
        randomize_adapter(split, 7, scale=0.3)
        layer, head = split._merged_head()
        if kernels == "q8":
            assert isinstance(head, NativeLinear) and head.kernels == NativeKernels("q8", "q8")
            assert isinstance(layer.gate_up, NativeLinear)
        else:
            assert isinstance(head, PackedLinear)
        cache, exit_cache = split.new_cache(16), split.new_exit_cache(16)
        ids, pos = torch.tensor([[5, 9, 14, 3]]), torch.arange(4)[None]
        with torch.inference_mode():
            logits[kernels] = split.draft(split.shallow(ids, pos, cache), pos, exit_cache)
    scale = float(logits["gguf"].abs().max())
    assert torch.allclose(logits["q8"], logits["gguf"], atol=0.05 * scale)


def test_draft_cost_is_timed_once_on_native_weights():
    """On native weights `draft_cost` is timed (bytes do not predict time there): a positive
    share of a verifier pass, measured once and then reused (arbitration reads it every block)."""
    split = native_tiny_split(seed=8, exit_layer=2)
    cost, row_cost, probe_cost = split.draft_cost, split.row_cost, split.probe_cost
    assert 0.0 < cost < 10.0
    assert 0.0 <= row_cost < 10.0  # one more verify row, timed with it
    assert 0.0 < probe_cost < 10.0  # the exit head alone, timed with them
    assert (split.draft_cost, split.row_cost, split.probe_cost) == (cost, row_cost, probe_cost)


def test_costs_are_timed_at_a_short_and_a_long_context_and_interpolated_by_length(monkeypatch):
    """`costs(length)` on native weights: the timings at `COST_CONTEXTS` (each once), linear in
    the sequence length between them and clamped outside; the properties are the short context's."""
    split = native_tiny_split(seed=8, exit_layer=2)
    timed = []
    monkeypatch.setattr(type(split), "_time_costs", lambda self, context: timed.append(context) or (0.1 + context / 1000, context / 2000, 0.05))
    short, long = split.COST_CONTEXTS
    assert split.costs(0) == split.costs(short) == (split.draft_cost, split.row_cost, split.probe_cost)
    top = min(long, split.max_positions - 8)  # a model with fewer positions is timed at its longest
    assert timed == [short, top] and short < top
    assert split.costs(10**6) == split.costs(top) == (0.1 + top / 1000, top / 2000, 0.05)
    middle = (short + top) // 2
    assert split.costs(middle) == pytest.approx((0.1 + middle / 1000, middle / 2000, 0.05))
    assert len(timed) == 2  # timed once per split, whatever is asked afterwards


def test_given_costs_replace_the_timing(monkeypatch):
    """`use_costs`: a split prices blocks with another process's timings and times nothing itself."""
    split = native_tiny_split(seed=8, exit_layer=2)
    monkeypatch.setattr(type(split), "_time_costs", lambda self, context: pytest.fail("timed although costs were given"))
    split.use_costs([(64, (0.2, 0.1, 0.1)), (1024, (0.4, 0.3, 0.1))])
    assert split.costs(0) == (0.2, 0.1, 0.1)
    assert split.costs(544) == pytest.approx((0.3, 0.2, 0.1))
    for bad in ([], [(1024, (0.2, 0.1, 0.1)), (64, (0.2, 0.1, 0.1))], [(64, (0.2, 0.1))], [(64, (0.2, -0.1, 0.1))]):
        with pytest.raises(ValueError):
            split.use_costs(bad)
    assert split.costs(0) == (0.2, 0.1, 0.1)  # a rejected call changed nothing
