"""The non-matmul parts of a decoder layer as single C calls (common/model/engine/gguf_kernels.py
compiles them): RMSNorm, residual add + RMSNorm, SiLU gating, and rotary embedding + KV-cache
append (the attention itself is `gguf_kernels.causal_attention`).

Why: at batch 1 on a CPU, once the weights run at native precision, a layer's matrix products
take ~0.15 ms and the ~60 small torch ops around them (norms, rotary halves, cache writes, views)
~0.35 ms. One C call per piece removes that overhead. Every row is computed alone, by the same
instructions whatever the number of rows and threads, so a verify block's rows equal the one-row
steps bit for bit (as the q8 matrix kernel and `causal_attention` already guarantee).

All functions take and return fp32 CPU tensors; `runs(stack dtype, device)` says where they apply.
Shapes: T rows, H hidden size, hd head dim.
"""

from __future__ import annotations

import torch

from common.model.engine import gguf_kernels


def runs(dtype: torch.dtype, device: torch.device, head_dim: int, intermediate: int) -> bool:
    """True when these kernels can run a layer: compiled here, fp32 on CPU, head_dim a multiple of
    8 up to 256 (the attention kernel) and an intermediate size a multiple of 8 (SiLU gating)."""
    return (gguf_kernels.available() and dtype == torch.float32 and torch.device(device).type == "cpu"
            and head_dim % 8 == 0 and head_dim <= 256 and intermediate % 8 == 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] -> weight * (x / sqrt(mean(x^2) + eps)) [T, H] (HF LlamaRMSNorm, fp32)."""
    out = torch.empty_like(x)
    gguf_kernels._library().rms_norm_rows(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, out.data_ptr())
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)), both [T, H]: a residual add and the next norm in one call."""
    total, out = torch.empty_like(x), torch.empty_like(x)
    gguf_kernels._library().add_rms_norm_rows(x.data_ptr(), delta.contiguous().data_ptr(), x.shape[0], x.shape[1],
                                              weight.data_ptr(), eps, total.data_ptr(), out.data_ptr())
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate then up) -> silu(gate) * up [T, I]."""
    rows, width = gate_up.shape
    out = torch.empty(rows, width // 2)
    gguf_kernels._library().silu_mul_rows(gate_up.data_ptr(), rows, width // 2, out.data_ptr())
    return out


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                past: int, heads: int) -> torch.Tensor:
    """Rotary embedding and KV-cache append after the fused QKV projection.

    qkv [T, (heads + 2 kv_heads) hd] contiguous: rows at positions past .. past + T - 1; cos, sin
    [T, hd] contiguous (HF's rotary tables); keys, values: one layer's cache buffers
    [kv_heads, capacity, hd] fp32 contiguous, capacity >= past + T. Rotates q and k, writes k and
    v into rows past .. past + T - 1 of the buffers, and returns the rotated queries [heads, T, hd]."""
    rows = qkv.shape[0]
    kv_heads, _, hd = keys.shape
    q = torch.empty(heads, rows, hd)
    gguf_kernels._library().rope_append(
        qkv.data_ptr(), rows, heads, kv_heads, hd, cos.data_ptr(), sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        keys.stride(0), past, q.data_ptr())
    return q
