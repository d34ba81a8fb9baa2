"""A lean inference forward of a Llama-style decoder stack, over the HF model's own weights.

The same math as transformers' Llama layers (RMSNorm, rotary attention with grouped KV heads,
gated MLP), with what batch-1 decoding on a CPU pays for removed:
  * Q/K/V and gate/up projections fused into one matrix each, every matrix a `PackedLinear`
    (the fastest layout per batch size; see common/model/engine/packed_linear.py);
  * a `StaticKVCache` (no re-concatenation of the cache per token, O(1) crop);
  * rotary cos/sin looked up from a table instead of recomputed per call;
  * no per-call mask building for single-token steps, no HF output dataclasses, no hooks.

It is an inference path only: training (the learner) runs the HF/peft modules. `SplitModel`
checks at load time that this path reproduces the HF forward (`_check_parity`) and uses the HF
layers instead when it does not, or when `fast_path_blocker` names a reason.

Shapes: T rows (positions) of one sequence; H hidden size; activations are [T, H] (no batch dim).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from common.model.engine import gguf_kernels, layer_ops
from common.model.engine.kv_cache import StaticKVCache
from common.model.engine.native_weights import AffineInt4, concat_rows
from common.model.engine.packed_linear import NativeKernels, NativeLinear, PackedLinear, choose_native_kernels

FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
"""Model types whose decoder layer this module reproduces (checked again numerically at load)."""
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})

WeightOf = Callable[[nn.Module], torch.Tensor]
NativeOf = Callable[[nn.Module], "AffineInt4 | None"]
Linear = PackedLinear | NativeLinear
NATIVE_ROLES = ("qkv", "o", "gate_up", "down")
"""The FastLayer matrices that can run at native precision (each probed as one role across layers)."""


def no_native(linear: nn.Module) -> None:
    return None


def fused_linear(modules: list[nn.Module], weight_of: WeightOf, native_of: NativeOf, bias,
                 kernels: NativeKernels | None = None) -> Linear:
    """One linear applying `modules` stacked along their outputs: a `NativeLinear` (running
    `kernels`, or probed later when None) when every one has a native-precision matrix
    (`native_of`), else a `PackedLinear` over `weight_of` of each."""
    natives = [native_of(m) for m in modules]
    if all(n is not None for n in natives):
        return NativeLinear(natives[0] if len(natives) == 1 else concat_rows(natives), bias, kernels)
    weights = [weight_of(m) for m in modules]
    return PackedLinear(weights[0] if len(weights) == 1 else torch.cat(weights), bias)


def plain_weight(linear: nn.Module) -> torch.Tensor:
    return linear.weight


def fast_path_blocker(model: nn.Module) -> str | None:
    """Why `FastStack` cannot run `model` (an HF causal LM), or None when it can."""
    cfg = model.config
    if cfg.model_type not in FAST_MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one of {sorted(FAST_MODEL_TYPES)}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in _STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} (its tables change with the sequence length)"
    for layer in model.get_decoder().layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names):
            return "attention without q/k/v/o linear projections"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "query/key norms"
        if mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return "an MLP without gate/up/down projections"
        for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
            if norm is None or _norm_eps(norm) is None:
                return "layer norms that are not RMSNorm"
    return None


def _is_silu(act: Callable) -> bool:
    """True when `act` computes SiLU (transformers' activation classes vary by version)."""
    probe = torch.linspace(-8, 8, 33)
    with torch.no_grad():
        return isinstance(act, nn.SiLU) or torch.allclose(act(probe), F.silu(probe), atol=1e-6)


def _norm_eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale (the same order of operations)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def chunk_mask(rows: int, past: int, device) -> torch.Tensor | None:
    """Boolean attention mask [rows, past + rows] (True = attend) for a chunk appended after `past`
    cached positions: row i sees every cached position and the chunk's rows 0..i. None for one
    row, which sees everything, and for a chunk with nothing cached before it (a prefill), which
    SDPA masks itself with `is_causal` (and skips the masked blocks)."""
    if rows == 1 or past == 0:
        return None
    return torch.ones(rows, past + rows, dtype=torch.bool, device=device).tril(past)


class FastLayer:
    """One decoder layer (inference): x [T, H] -> x [T, H], appending its keys/values to a cache slot.

    Built from an HF Llama-style layer; `weight_of(linear)` gives the weight each projection
    applies (the plain weight, or a LoRA-merged one for the drafter's exit layer); `native_of(linear)`
    its matrix at native precision (a GGUF's Q4_1 blocks), or None to use `weight_of`; `kernels`
    fixes the native matrices' kernels (None: the stack's probe chooses them).
    """

    def __init__(self, layer: nn.Module, weight_of: WeightOf = plain_weight, native_of: NativeOf = no_native,
                 kernels: NativeKernels | None = None):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = int(attn.head_dim)
        self.q_heads = base_linear(q).out_features // self.head_dim
        self.kv_heads = base_linear(k).out_features // self.head_dim
        self.scale = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.qkv = fused_linear(
            [q, k, v], weight_of, native_of, _cat_bias([base_linear(q).bias, base_linear(k).bias, base_linear(v).bias]),
            kernels)
        self.o = fused_linear([o], weight_of, native_of, base_linear(o).bias, kernels)
        self.intermediate = base_linear(mlp.gate_proj).out_features
        self.gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], weight_of, native_of, None, kernels)
        self.down = fused_linear([mlp.down_proj], weight_of, native_of, base_linear(mlp.down_proj).bias, kernels)
        self.act = mlp.act_fn
        self.norm1 = (layer.input_layernorm.weight.detach(), _norm_eps(layer.input_layernorm))
        self.norm2 = (layer.post_attention_layernorm.weight.detach(), _norm_eps(layer.post_attention_layernorm))
        self._split = [self.q_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.c_ops = _is_silu(self.act) and layer_ops.runs(
            self.norm1[0].dtype, self.norm1[0].device, self.head_dim, self.intermediate)
        """True: the non-matmul parts run as single C calls (layer_ops), else as torch ops."""

    def weight_bytes(self, rows: int = 1) -> int:
        """Bytes of weight matrices one call on `rows` rows streams."""
        return sum(getattr(self, role).bytes_read(rows) for role in NATIVE_ROLES)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache, slot: int,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """x [T, H]; cos/sin [T, head_dim] of the rows' positions; mask [T, past + T] bool or None."""
        if self.c_ops:
            return self._c_call(x.contiguous(), cos, sin, cache, slot, mask)
        rows = x.shape[0]
        q, k, v = self.qkv(rms_norm(x, *self.norm1)).split(self._split, dim=-1)
        q = _rotate(q.view(rows, self.q_heads, self.head_dim).transpose(0, 1), cos, sin)  # [heads, T, hd]
        k = _rotate(k.view(rows, self.kv_heads, self.head_dim).transpose(0, 1), cos, sin)
        keys, values = cache.append(slot, k, v.view(rows, self.kv_heads, self.head_dim).transpose(0, 1))
        x = x + self.o(self._attention(q, keys, values, mask))
        gate, up = self.gate_up(rms_norm(x, *self.norm2)).split(self.intermediate, dim=-1)
        return x + self.down(self.act(gate) * up)

    def _c_call(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache,
                slot: int, mask: torch.Tensor | None) -> torch.Tensor:
        """The same layer with its non-matmul parts as C calls (layer_ops), each row computed
        alone; the attention itself is `_attention`'s, as in the torch path."""
        rows = x.shape[0]
        qkv = self._c_qkv(x)
        keys, values, past = cache.reserve(slot, rows)
        q = layer_ops.rope_append(qkv, cos, sin, keys, values, past, self.q_heads)
        return self._c_after_attention(x, self._attention(q, keys[:, :past + rows], values[:, :past + rows], mask))

    def _c_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The fused Q/K/V projection of the normed rows x [T, H] (C ops): [T, (heads + 2 kv_heads) hd]."""
        return self.qkv(layer_ops.rms_norm(x, *self.norm1)).contiguous()

    def _c_after_attention(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of the layer after attention (C ops): x [T, H] plus the o projection of attn
        [T, heads * hd], then the gated MLP on its norm, as a residual."""
        x, h = layer_ops.add_rms_norm(x, self.o(attn), *self.norm2)
        return x + self.down(layer_ops.silu_mul(self.gate_up(h).contiguous()))

    def sequence_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[StaticKVCache],
                      slot: int) -> torch.Tensor:
        """One new row per sequence: x [B, H], row b the next position of the sequence in
        `caches[b]` (cos/sin [B, head_dim] of each row's position). The matrices run on all B rows
        in one pass over the weights; the rotary, cache append and attention run per row, against
        its own sequence's cache. Each row's result equals that sequence's one-row step (`__call__`
        on x[b:b+1]) wherever the matrices compute rows alone (the q8 kernel: bit for bit)."""
        if not self.c_ops:
            return torch.cat([self(x[b:b + 1], cos[b:b + 1], sin[b:b + 1], cache, slot, None)
                              for b, cache in enumerate(caches)])
        x = x.contiguous()
        attn = gguf_kernels.sequence_rows_attention(self._c_qkv(x), cos, sin, [cache.reserve(slot, 1) for cache in caches],
                                                    self.q_heads, self.scale)
        return self._c_after_attention(x, attn)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        """q [heads, T, hd], keys/values [kv_heads, past + T, hd] -> [T, heads * hd].

        One-row steps and verify blocks (rows after cached ones) run `gguf_kernels.causal_attention`
        where it runs: each row is computed alone, so a verify block's rows equal the one-row
        steps bit for bit (torch's SDPA sums a block's rows in another order, and the q8 kernel's
        8-bit rounding turns such last-bit differences into visible ones). A prefill (no cached
        rows: the same call in every decoding method) and other devices/dtypes use SDPA."""
        rows = q.shape[1]
        prefill = mask is None and rows > 1  # nothing cached before these rows
        if not prefill and gguf_kernels.attention_runs(q, keys):
            return gguf_kernels.causal_attention(q, keys, values, self.scale)
        attn = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, is_causal=prefill, scale=self.scale,
            enable_gqa=self.q_heads != self.kv_heads,
        )[0]
        return attn.transpose(0, 1).reshape(rows, self.q_heads * self.head_dim)


class FastStack:
    """The whole decoder stack of an HF causal LM, inference only.

    embed(ids [T]) -> [T, H]; run(x, start, stop, cache, position) runs layers [start, stop) on
    rows at positions [position, position + T) (cache slots `start..stop-1` must hold exactly
    `position` positions); logits(x [T, H]) -> [T, V] float32 through the final norm and LM head.

    `native`: HF module name (`model.layers.3.mlp.up_proj`, `lm_head`) -> that matrix at the
    precision the model file ships in (common/model/engine/native_weights.py); those matrices run as
    `NativeLinear`s, whose kernels (torch's int4 kernel or the dense fp32 one) are timed per role
    and per row count here (`native_kernels` records the choice). The model's own (dequantised)
    weights must equal them; the embedding and norms always come from the model.
    """

    def __init__(self, model: nn.Module, native: "dict[str, AffineInt4] | None" = None):
        decoder = model.get_decoder()
        native = native or {}
        names = {module: name for name, module in model.named_modules()} if native else {}
        native_of: NativeOf = (lambda m: native.get(names.get(base_linear(m), ""))) if native else no_native
        self.layers = [FastLayer(layer, native_of=native_of) for layer in decoder.layers]
        self.embed_weight = decoder.embed_tokens.weight.detach()
        self.norm = (decoder.norm.weight.detach(), _norm_eps(decoder.norm))
        self.lm_head = fused_linear([model.lm_head], plain_weight, native_of, model.lm_head.bias)
        self.native_kernels: dict[str, NativeKernels] = {}
        for role in NATIVE_ROLES:
            linears = [getattr(layer, role) for layer in self.layers if isinstance(getattr(layer, role), NativeLinear)]
            if linears:
                self.native_kernels[role] = choose_native_kernels(linears)
        if isinstance(self.lm_head, NativeLinear):
            self.native_kernels["lm_head"] = choose_native_kernels([self.lm_head])
        self._rotary = decoder.rotary_emb
        self._cos = self._sin = None
        first = self.layers[0]
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim
        self.dtype, self.device = self.embed_weight.dtype, self.embed_weight.device

    def weight_bytes(self, rows: int = 1) -> int:
        """Bytes of weight matrices one forward of `rows` rows streams (every layer and the LM
        head, in the layouts their kernels read; norms and the embedding row are negligible)."""
        return sum(layer.weight_bytes(rows) for layer in self.layers) + self.lm_head.bytes_read(rows)

    @contextlib.contextmanager
    def fp32_activations(self) -> Iterator[None]:
        """Within: native matrices that run `q8` (8-bit activations) run `gguf` instead, the same
        blocks against fp32 activations. For the load-time parity check, which checks that this
        engine reproduces the architecture: the q8 kernel's activation rounding is a property of
        the kernel (bounded per matrix, common/model/engine/gguf_kernels.py GgufBlocks.q8), not of the model."""
        natives = [lin for layer in self.layers for lin in (getattr(layer, r) for r in NATIVE_ROLES)
                   if isinstance(lin, NativeLinear)] + ([self.lm_head] if isinstance(self.lm_head, NativeLinear) else [])
        saved = [lin.kernels for lin in natives]
        try:
            for lin in natives:
                lin.kernels = NativeKernels(*("gguf" if k == "q8" else k for k in (lin.kernels.one_row, lin.kernels.block)))
            yield
        finally:
            for lin, kernels in zip(natives, saved):
                lin.kernels = kernels

    def new_cache(self, num_layers: int, capacity: int) -> StaticKVCache:
        return StaticKVCache(num_layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, head_dim] of positions [start, end), from HF's own rotary module
        (so every scaling variant it implements gives the same values), tabulated once."""
        if self._cos is None or self._cos.shape[0] < end:
            size = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            positions = torch.arange(size, device=self.device)[None]
            with torch.no_grad():
                cos, sin = self._rotary(self.embed_weight[:1][None], positions)
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        return self._cos[start:end], self._sin[start:end]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)

    def run(self, x: torch.Tensor, start: int, stop: int, cache: StaticKVCache, position: int,
            slot_offset: int = 0) -> torch.Tensor:
        """Layers [start, stop) on x [T, H] whose rows sit at positions [position, position + T).

        Layer i uses cache slot i - slot_offset."""
        cos, sin = self.rope(position, position + x.shape[0])
        mask = chunk_mask(x.shape[0], position, x.device)
        for i in range(start, stop):
            x = self.layers[i](x, cos, sin, cache, i - slot_offset, mask)
        return x

    def run_sequences(self, x: torch.Tensor, start: int, stop: int, caches: list[StaticKVCache]) -> torch.Tensor:
        """Layers [start, stop) on x [B, H]: row b is the next position of the sequence cached in
        `caches[b]` (its slot `start` holds exactly that position's predecessors), as
        `FastLayer.sequence_rows` runs them: B sequences advance one position each for one pass
        over the weights."""
        positions = torch.tensor([cache.get_seq_length(start) for cache in caches])
        cos, sin = self.rope(0, int(positions.max()) + 1)
        cos, sin = cos[positions].contiguous(), sin[positions].contiguous()
        for i in range(start, stop):
            x = self.layers[i].sequence_rows(x, cos, sin, caches, i)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(rms_norm(x, *self.norm)).float()


def base_linear(linear: nn.Module) -> nn.Linear:
    """The nn.Linear inside a (possibly peft-wrapped) projection."""
    return linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear


def _cat_bias(biases: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    assert all(b is not None for b in biases), "Q, K and V projections must all have a bias or none"
    return torch.cat([b.detach() for b in biases])


_STACKS: "weakref.WeakKeyDictionary[nn.Module, dict[int, FastStack]]" = weakref.WeakKeyDictionary()


def shared_fast_stack(model: nn.Module, native: "dict[str, AffineInt4] | None" = None) -> FastStack:
    """The one FastStack of `model` per set of native weights (built on first use): every split
    of the same frozen model (several drafters in one benchmark, say) shares its packed weights
    instead of copying them."""
    stacks = _STACKS.setdefault(model, {})
    key = id(native) if native else 0
    stack = stacks.get(key)
    if stack is None:
        stack = stacks[key] = FastStack(model, native)
    return stack
