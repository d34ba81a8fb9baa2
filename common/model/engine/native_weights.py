"""A GGUF model's weight matrices at the precision they ship in, as exact affine 4-bit groups.

llama.cpp stores a matrix [N, K] row by row in blocks of 32 consecutive inputs (along K):
  Q4_1  one block = d (fp16), m (fp16), 16 bytes of nibbles; element j < 16 is the low nibble
        of byte j, element j >= 16 the high nibble of byte j - 16:   w = d * q + m,  q in 0..15;
  Q8_0  one block = d (fp16), 32 int8:                               w = d * q,      q in -128..127.

`AffineInt4` holds a matrix as a sum of parts, each `scale * q + offset` per group of 32 with
q in 0..15, which is what torch's CPU int4 kernel computes (common/model/engine/packed_linear.py). Q4_1 is one
part (scale d, offset m). Q8_0 is two: q + 128 = 16 h + l with h, l in 0..15, so
w = d q = [(16 d) h - 128 d] + [d l]: part one has scale 16 d and offset -128 d, part two scale d
and offset 0. Every scale and offset is an fp16 value times a power of two, so all are exact in
fp32 and `dequantize()` reproduces gguf's own dequantisation bit for bit (tests prove it on the
shipped file). Layers whose tensor type is anything else (F32 norms, other quantisations) are
left to the dequantised HF model.

Names: GGUF `blk.{i}.attn_q.weight` ... map to the HF module names `model.layers.{i}.self_attn.q_proj`;
the rows of Q and K are stored permuted for llama.cpp's rotary layout and are put back in HF's
order here (the same permutation transformers' GGUF loader undoes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GROUP = 32
"""Inputs per quantisation block (llama.cpp's QK4_1 and QK8_0)."""

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Int4Part:
    """One affine 4-bit part of a matrix [N, K]: W = scale[:, k // 32] * q[:, k] + offset[:, k // 32].

    q: uint8 [N, K] with values 0..15; scale, offset: float32 [N, K / 32]."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        expand = lambda t: t.repeat_interleave(GROUP, dim=1)  # noqa: E731
        return expand(self.scale) * self.q.float() + expand(self.offset)


@dataclass(frozen=True)
class AffineInt4:
    """A matrix [N, K] (K a multiple of 32) stored as the sum of its 4-bit parts (one or two).
    `kind` names the GGUF type it came from (Q4_1, Q8_0)."""

    parts: tuple[Int4Part, ...]
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.parts[0].q.shape)

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix [N, K] (the same values gguf's dequantisation gives)."""
        out = self.parts[0].dequantize()
        for part in self.parts[1:]:
            out = out + part.dequantize()
        return out

    def rows(self, index: torch.Tensor) -> "AffineInt4":
        """The matrix restricted to (or reordered by) rows `index` [n] int64."""
        return AffineInt4(tuple(Int4Part(p.q[index], p.scale[index], p.offset[index]) for p in self.parts), self.kind)

    @property
    def bytes_per_weight(self) -> float:
        """What the GGUF file spends per weight (Q4_1 0.625, Q8_0 1.0625)."""
        return {"Q4_1": 20 / GROUP, "Q8_0": 34 / GROUP}[self.kind]


def concat_rows(matrices: list[AffineInt4]) -> AffineInt4:
    """Stack matrices of the same kind and K along N (Q/K/V into one, gate/up into one)."""
    kinds = {m.kind for m in matrices}
    if len(kinds) != 1:
        raise ValueError(f"cannot stack matrices of kinds {sorted(kinds)}")
    parts = tuple(
        Int4Part(*(torch.cat([getattr(m.parts[i], f) for m in matrices]) for f in ("q", "scale", "offset")))
        for i in range(len(matrices[0].parts))
    )
    return AffineInt4(parts, matrices[0].kind)


def _fp16(raw: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 little-endian fp16 -> float32 tensor [...] (exact)."""
    return torch.from_numpy(np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32))


def q4_1_matrix(blocks: np.ndarray, rows: int, cols: int) -> AffineInt4:
    """Decode Q4_1 data [rows, cols / 32 * 20] (uint8) into one affine 4-bit part."""
    b = blocks.reshape(rows, cols // GROUP, 20)
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    nibbles = torch.from_numpy(np.ascontiguousarray(b[..., 4:]))  # [rows, groups, 16]
    q = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(rows, cols)
    return AffineInt4((Int4Part(q.contiguous(), d, m),), "Q4_1")


def q8_0_matrix(blocks: np.ndarray, rows: int, cols: int) -> AffineInt4:
    """Decode Q8_0 data [rows, cols / 32 * 34] (uint8) into two affine 4-bit parts (see the module doc)."""
    b = blocks.reshape(rows, cols // GROUP, 34)
    d = _fp16(b[..., 0:2])
    shifted = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.int16) + 128)  # 0..255
    high = (shifted >> 4).to(torch.uint8).reshape(rows, cols)
    low = (shifted & 0x0F).to(torch.uint8).reshape(rows, cols)
    return AffineInt4((Int4Part(high, 16 * d, -128 * d), Int4Part(low, d, torch.zeros_like(d))), "Q8_0")


def quantize_q8_0(weight: torch.Tensor) -> AffineInt4:
    """An fp32 matrix [N, K] (K a multiple of 32) quantised to Q8_0 as llama.cpp does it: per block
    of 32, d = max|w| / 127 (stored fp16) and q = round(w / d); returned as `q8_0_matrix` returns a
    file's Q8_0 matrix. For matrices the model file does not ship (the drafter's merged exit head):
    the drafter may run approximate weights, since the verifier alone decides what is emitted."""
    rows, cols = weight.shape
    blocks = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    d = (blocks.abs().amax(-1) / 127).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int16).reshape(rows, cols)
    shifted = q + 128
    high, low = (shifted >> 4).to(torch.uint8), (shifted & 0x0F).to(torch.uint8)
    return AffineInt4((Int4Part(high, 16 * d, -128 * d), Int4Part(low, d, torch.zeros_like(d))), "Q8_0")


_DECODERS = {"Q4_1": q4_1_matrix, "Q8_0": q8_0_matrix}


def _unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation for `heads` heads (HF order <- GGUF order)."""
    dim = rows // heads // 2
    return torch.arange(rows).reshape(heads, dim, 2).transpose(1, 2).reshape(rows)


def read_native_weights(path: str | Path, num_heads: int, num_kv_heads: int) -> dict[str, AffineInt4]:
    """The matrices of a Llama GGUF file that ship as Q4_1 or Q8_0, by HF module name
    (`model.layers.{i}.self_attn.q_proj`, ..., `lm_head` for the output matrix; a file without
    `output.weight` ties the LM head to `token_embd`). Other tensors are not returned."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out: dict[str, AffineInt4] = {}
    tensors = {t.name: t for t in reader.tensors}
    for name, tensor in tensors.items():
        kind = tensor.tensor_type.name
        decode = _DECODERS.get(kind)
        if decode is None:
            continue
        cols, rows = (int(n) for n in tensor.shape[:2])  # GGUF lists dimensions innermost first
        if name in ("output.weight", "token_embd.weight"):
            if name == "token_embd.weight" and "output.weight" in tensors:
                continue
            out["lm_head"] = decode(np.asarray(tensor.data), rows, cols)
            continue
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_TO_HF:
            continue
        matrix = decode(np.asarray(tensor.data), rows, cols)
        if parts[2] in ("attn_q", "attn_k"):
            matrix = matrix.rows(_unpermute_rows(rows, num_heads if parts[2] == "attn_q" else num_kv_heads))
        out[f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}"] = matrix
    return out
