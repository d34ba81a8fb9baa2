"""The C decode attention (`gguf_kernels.causal_attention`): softmax attention of grouped query
heads, each (head, row) bitwise independent of the block it is in and of the heads computed
beside it."""

import math

import pytest
import torch

from common.model.engine import gguf_kernels

pytestmark = pytest.mark.skipif(not gguf_kernels.available(),
                                reason="no C compiler or no AVX2/FMA here: the engine uses torch's attention")

# (query heads, kv heads, head dim): SmolLM2's 9 over 3, groups of 1, 2, 4 and 5 (run as 3 + 2)
# heads, and head dims of 1 to 4 chunks of 64
SHAPES = [(9, 3, 64), (4, 4, 32), (8, 4, 128), (8, 2, 256), (10, 2, 64)]


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 causal attention: q [H, T, hd] at the last T of keys/values [KVH, n, hd] -> [T, H * hd]."""
    heads, rows, hd = q.shape
    group = heads // keys.shape[0]
    k = keys.double().repeat_interleave(group, 0)
    v = values.double().repeat_interleave(group, 0)
    n = keys.shape[1]
    scores = torch.einsum("htd,hjd->htj", q.double(), k) * scale
    allowed = torch.arange(n)[None] <= torch.arange(n - rows, n)[:, None]  # [T, n]
    scores = scores.masked_fill(~allowed, -math.inf)
    out = torch.einsum("htj,hjd->htd", torch.softmax(scores, -1), v)
    return out.transpose(0, 1).reshape(rows, heads * hd)


@pytest.mark.parametrize("heads,kv_heads,hd", SHAPES)
def test_causal_attention_matches_softmax_attention_and_each_row_alone(heads, kv_heads, hd):
    torch.manual_seed(heads * 1000 + hd)
    past, rows, scale = 37, 5, hd ** -0.5
    keys = torch.randn(kv_heads, past + rows, hd)
    values = torch.randn(kv_heads, past + rows, hd)
    q = torch.randn(heads, rows, hd)
    got = gguf_kernels.causal_attention(q, keys, values, scale)
    assert got.shape == (rows, heads * hd)
    assert torch.allclose(got.double(), reference(q, keys, values, scale), rtol=1e-4, atol=1e-5)
    for t in range(rows):  # the one-row step at position past + t gives the same bits
        alone = gguf_kernels.causal_attention(q[:, t:t + 1], keys[:, :past + t + 1], values[:, :past + t + 1], scale)
        assert torch.equal(alone[0], got[t]), t


def test_causal_attention_computes_each_head_as_it_would_alone():
    """A head's result does not depend on the heads sharing its kv head: with one query head per
    call (group 1) each head gives the bits it gives among its group of 3."""
    torch.manual_seed(5)
    keys, values = torch.randn(3, 130, 64), torch.randn(3, 130, 64)
    q = torch.randn(9, 2, 64)
    grouped = gguf_kernels.causal_attention(q, keys, values, 0.125)
    for h in range(9):
        kv = h // 3
        alone = gguf_kernels.causal_attention(q[h:h + 1], keys[kv:kv + 1], values[kv:kv + 1], 0.125)
        assert torch.equal(alone, grouped[:, h * 64:(h + 1) * 64]), h
