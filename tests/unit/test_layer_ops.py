"""The C layer ops (common/model/engine/layer_ops.py): each against its torch form, and a decoder
stack that runs them against the torch path, bit for bit across row counts and thread counts."""

import pytest
import torch
import torch.nn.functional as F

from common.model.engine import gguf_kernels, layer_ops
from common.model.engine.fast_decoder import FastStack, rms_norm
from common.model.engine.packed_linear import NATIVE_KERNELS_ENV
from tests.tiny_models import quantize_native, tiny_llama

pytestmark = pytest.mark.skipif(not gguf_kernels.available(),
                                reason="no C compiler or no AVX2/FMA here: the engine uses torch's ops")


def test_each_op_matches_its_torch_form():
    torch.manual_seed(0)
    x, delta, weight = torch.randn(5, 72), torch.randn(5, 72), torch.rand(72) + 0.5
    assert torch.allclose(layer_ops.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    total, normed = layer_ops.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(total, x + delta)
    assert torch.allclose(normed, rms_norm(x + delta, weight, 1e-6), rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(3, 2 * 40) * 6
    gate_up[0, :3] = torch.tensor([-100.0, 0.0, 100.0])  # exp's underflow and the sign switch
    expected = F.silu(gate_up[:, :40]) * gate_up[:, 40:]
    assert torch.allclose(layer_ops.silu_mul(gate_up), expected, rtol=1e-5, atol=1e-6)


def _stack(c_ops: bool, native: bool = False) -> FastStack:
    model = tiny_llama(seed=3, layers=3, hidden=64)
    stack = FastStack(model, quantize_native(model) if native else None)
    for layer in stack.layers:
        assert layer.c_ops  # head_dim 16, intermediate 128: the C path applies
        layer.c_ops = c_ops
    return stack


def _run(stack: FastStack, ids: list[int], steps: list[int]) -> torch.Tensor:
    """Hidden states of `ids`, prefilled then fed in chunks of `steps` rows, concatenated."""
    cache = stack.new_cache(len(stack.layers), 8)  # small: the cache grows during the run
    out, at = [], 0
    with torch.inference_mode():
        for rows in steps:
            chunk = torch.tensor(ids[at:at + rows])
            out.append(stack.run(stack.embed(chunk), 0, len(stack.layers), cache, at))
            at += rows
    return torch.cat(out)


def test_c_layers_match_the_torch_layers():
    ids = [int(i) for i in torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(1))]
    c_out = _run(_stack(True), ids, [10] + [1] * 14)
    assert torch.allclose(c_out, _run(_stack(False), ids, [10] + [1] * 14), rtol=1e-4, atol=1e-5)


def test_native_c_layers_do_not_depend_on_row_or_thread_counts(monkeypatch):
    """With the q8 matrix kernel (row-invariant), a verify block's rows equal the one-row steps at
    those positions bit for bit, at 1 or 2 threads (after the same prefill, which runs SDPA)."""
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "q8")
    ids = [int(i) for i in torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(1))]
    stack = _stack(True, native=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        steps = _run(stack, ids, [10] + [1] * 14)
        assert torch.equal(_run(stack, ids, [10, 5, 1, 8]), steps)
        torch.set_num_threads(2)
        assert torch.equal(_run(stack, ids, [10, 5, 1, 8]), _run(stack, ids, [10] + [1] * 14))
    finally:
        torch.set_num_threads(threads)
