"""The DVI split of one frozen causal LM into a drafter and a verifier that share computation.

  drafter  = embed -> decoder layers [0, k) -> exit head -> q
  verifier = embed -> decoder layers [0, k) -> decoder layers [k, L) -> final norm -> LM head -> p

Both halves run on one set of frozen base weights (no copy of the model). The verifier's deep
pass takes the drafter's layer-k hidden states, so the shallow layers run once per token.

The exit head (Kangaroo-style exit adapter) is the only trainable part: one decoder layer
initialised from one of the model's own layers (a small copy, with its own KV cache), then the
model's final norm and LM head (shared, not copied). Every trainable tensor is a peft LoRA
adapter on that layer's projections and on the LM head *as seen by the drafter*; the verifier
calls the base LM head directly, so no adapter can change its logits (trap 2 of the reference
code: nothing trainable sits before h_k or inside the verifier).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import peft
import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from transformers import DynamicCache

from common.core.config import DrafterConfig, ModelSpec
from common.model.draft_vocab import checked_draft_vocab, select_draft_vocab
from common.core.errors import AdapterError, ModelLoadError
from common.model.engine.fast_decoder import (FastLayer, FastStack, base_linear, chunk_mask, fast_path_blocker, no_native,
                                              rms_norm, shared_fast_stack)
from common.model.engine.kv_cache import StaticKVCache
from common.model.loading import load_model_and_tokenizer, load_native_weights
from common.model.engine.native_weights import quantize_q8_0
from common.model.engine.packed_linear import NativeKernels, NativeLinear, PackedLinear

log = logging.getLogger(__name__)

ADAPTER_META_FILE = "dvi_adapter.json"
DRAFT_VOCAB_KEY = "dvi.draft_vocab"
"""The entry of `adapter_state()` that holds the draft vocabulary (int64 ids), next to peft's LoRA tensors."""
DEFAULT_CACHE_CAPACITY = 1024
ENGINES = ("fast", "hf")
_PARITY_ATOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
_NATIVE_PARITY_SCALE = 1e-3
"""With native weights the tolerance is at least this share of the largest reference logit: the
kernels apply the same weight values but sum in their own order (torch's int4 kernel differs from
the dequantised fp32 forward by about 2e-3 on SmolLM2's logits of magnitude ~20), while an
unsupported architecture differs by O(1)."""


def causal_mask(q_len: int, past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive attention mask [1, 1, q_len, past_len + q_len] for a chunk appended after `past_len`
    cached positions (query i sits at absolute position past_len + i). None for a single query,
    which may attend to everything cached."""
    if q_len == 1:
        return None
    query_pos = torch.arange(q_len, device=device)[:, None] + past_len
    key_pos = torch.arange(past_len + q_len, device=device)[None, :]
    mask = torch.zeros(q_len, past_len + q_len, dtype=dtype, device=device)
    return mask.masked_fill(key_pos > query_pos, torch.finfo(dtype).min)[None, None]


def effective_draft_vocab_size(size: int, vocab_size: int) -> int:
    """The draft vocabulary size a configured `size` means for a model of `vocab_size` tokens:
    any size >= vocab_size would be no reduction, so it means 0 (the full vocabulary)."""
    return size if size < vocab_size else 0


def crop_cache(cache, length: int) -> None:
    """Drop every cached position >= `length` in every layer of `cache` (no-op where shorter)."""
    if isinstance(cache, StaticKVCache):
        cache.crop(length)
        return
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel() and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def cached_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [kv_heads, length, head_dim] that `layer` of `cache` (either kind) holds."""
    if isinstance(cache, StaticKVCache):
        n = cache.get_seq_length(layer)
        return cache.keys[layer][:, :n], cache.values[layer][:, :n]
    return cache.layers[layer].keys[0], cache.layers[layer].values[0]


def call_layer(layer: nn.Module, hidden, rope, mask=None, position_ids=None, cache=None) -> torch.Tensor:
    """One HF decoder layer on hidden [B, T, H]; appends to `cache` when given. Returns [B, T, H]."""
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        position_embeddings=rope,
        **{_cache_kwarg(type(layer.modules_to_save[layer.active_adapters[0]] if isinstance(layer, ModulesToSaveWrapper) else layer)): cache},
    )
    return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


@functools.cache
def _cache_kwarg(layer_type: type) -> str:
    """The name a decoder layer's forward takes its KV cache under (transformers 5.x renamed
    `past_key_values` to `cache` and warns on the old name)."""
    params = inspect.signature(layer_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ExitHead(nn.Module):
    """q's head: exit block (one decoder layer) -> final norm -> LM head, over layer-k hidden states.

    forward(hidden [B, T, H], position_embeddings (cos, sin), attention_mask, cache, logits_for)
    -> logits [B, T', V] where T' = T, or the last `logits_for` positions only.
    """

    def __init__(self, block: nn.Module, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.block = block  # not "layer": peft's modules_to_save matches names by suffix, and "base_layer" ends in "layer"
        self.norm = norm
        self.lm_head = lm_head

    def exit_block(self) -> nn.Module:
        """The decoder layer that runs: peft's trainable copy when the block trains at full rank
        (a ModulesToSaveWrapper), else the (LoRA-wrapped) block itself."""
        block = self.block
        if isinstance(block, ModulesToSaveWrapper):
            return block.modules_to_save[block.active_adapters[0]]
        return block

    def forward(self, hidden, position_embeddings, attention_mask=None, cache=None, position_ids=None, logits_for=None):
        out = call_layer(self.block, hidden, position_embeddings, attention_mask, position_ids, cache)
        if logits_for == 0:
            return None
        if logits_for is not None:
            out = out[:, -logits_for:]
        return self.lm_head(self.norm(out))


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that tells two base models apart (dimensions + a slice of the embedding)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, emb.shape[0]], sort_keys=True
        ).encode()
    )
    h.update(emb[: min(8, emb.shape[0])].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _llama_decoder(model, model_id: str, engine: str):
    """`model`'s decoder stack; ModelLoadError unless it is Llama-style (embed_tokens, layers,
    norm, rotary_emb) with an lm_head, ValueError for an unknown `engine`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, name) for name in needed):
        raise ModelLoadError(
            f"'{model_id}' ({type(model).__name__}) has no Llama-style decoder stack "
            "(embed_tokens, layers, norm, rotary_emb); dvi cannot split it"
        )
    if getattr(model, "lm_head", None) is None:
        raise ModelLoadError(f"'{model_id}' has no lm_head; dvi needs a causal LM")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return decoder


def _exit_head(init_layer: nn.Module, norm: nn.Module, lm_head: nn.Module, config: DrafterConfig):
    """The exit head as a peft model, in eval mode: a copy of `init_layer` (full rank, saved with
    the adapter, or LoRA) + the frozen final norm + the LM head (LoRA when `adapt_lm_head`); only
    the LoRA tensors and the full-rank copy train."""
    block = copy.deepcopy(init_layer)
    block.self_attn.layer_idx = 0  # it owns a one-layer cache of its own
    head = ExitHead(block, norm, lm_head)
    full_rank = config.full_rank_exit_layer
    targets = [name for name, module in head.named_modules() if isinstance(module, nn.Linear)
               and (config.adapt_lm_head if name == "lm_head" else not full_rank)]
    lora = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets,
        modules_to_save=["block"] if full_rank else None,  # a trainable full copy, saved with the adapter
        bias="none",
    )
    exit_head = peft.get_peft_model(head, lora)
    exit_head.eval()
    for name, param in exit_head.named_parameters():
        param.requires_grad_("lora_" in name or ".modules_to_save." in name)
    return exit_head


class SplitModel:
    """A frozen base model cut at `exit_layer`, with a LoRA-adapted exit head.

    Attributes: model (frozen HF causal LM), tokenizer, drafter_config, exit_layer (k),
    num_layers (L), vocab_size (V), hidden_size (H), weight_version (int, version of the adapter
    now loaded), exit_head (the peft-wrapped ExitHead), eos_token_ids (set[int]), engine ("fast"
    when the lean forward of common/model/engine/fast_decoder.py runs inference, "hf" for the HF layers),
    draft_vocab_size (V', 0 for the full vocabulary: the configured size, 0 when it is not below V),
    draft_vocab ([V'] int64 ids the drafter proposes from, ascending; all V ids when V' is 0).

    Inference pieces (shallow, deep, draft) take [1, T] inputs whose rows sit right after what
    the cache they are given already holds; the caches come from `new_cache` / `new_exit_cache`.
    """

    def __init__(self, model, tokenizer, drafter_config: DrafterConfig, model_id: str, engine: str = "fast",
                 native: dict | None = None):
        decoder = _llama_decoder(model, model_id, engine)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.decoder = decoder
        self.layers = list(decoder.layers)
        self.num_layers = len(self.layers)
        drafter_config.validate_for(self.num_layers)
        self.drafter_config = drafter_config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.draft_vocab_size = effective_draft_vocab_size(drafter_config.draft_vocab_size, self.vocab_size)
        self.exit_layer = drafter_config.exit_layer
        self.hidden_size = model.config.hidden_size
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.fingerprint = model_fingerprint(model)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.weight_version = 0
        self._layer_weights = sum(p.numel() for p in self.layers[0].parameters())

        self.exit_head = _exit_head(self.layers[drafter_config.init_layer_for(self.num_layers)], decoder.norm,
                                    model.lm_head, drafter_config)
        self._head: ExitHead = self.exit_head.base_model.model  # LoRA layers live inside it
        self.draft_vocab = self._initial_draft_vocab()
        self.native = native or None  # base matrices at the model file's precision (fast engine only)
        self._fast: FastStack | None = None
        self._fast_head: tuple[FastLayer, PackedLinear | NativeLinear] | None = None  # merged exit head; None = rebuild
        self._timed_costs: tuple[tuple[int, tuple[float, float, float]], ...] | None = None  # native weights: (context, (draft, row, probe cost)) ascending, timed on first use
        self.starts_trained = False
        """True once the drafter was loaded from trained weights (a warm start, a saved adapter):
        the learner then fine-tunes it at `LearnerConfig.fine_tune_lr`."""
        self.engine = "hf"
        self._check_parity()
        if engine == "fast":
            self._try_fast_engine()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, spec: ModelSpec) -> "SplitModel":
        model, tokenizer = load_model_and_tokenizer(spec.model, spec.dtype, spec.device)
        native = None
        if spec.weights == "native" and spec.engine == "fast":
            if spec.dtype == "float32" and torch.device(spec.device).type == "cpu":
                native = load_native_weights(spec.model, model.config)
            else:
                log.info("native weights run on CPU in float32 only; '%s' runs dequantised to %s", spec.model, spec.dtype)
        split = cls(model, tokenizer, spec.drafter, spec.model, engine=spec.engine, native=native)
        if spec.warm_start:
            split.start_from_warm_start()
        return split

    def sibling(self, drafter_config: DrafterConfig, engine: str | None = None) -> "SplitModel":
        """Another drafter (`drafter_config`, untrained) on this split's frozen base model and its
        native weights: no second copy of either. `engine` defaults to the one this split runs."""
        return SplitModel(self.model, self.tokenizer, drafter_config, self.model_id,
                          engine=engine or self.engine, native=self.native)

    def start_from_warm_start(self) -> Path | None:
        """Load the first warm start (common/model/warm_start.py) that fits this drafter, at weight
        version 0; returns its directory, or None (logged) when none fits: the head stays untrained."""
        from common.model.warm_start import warm_start_candidates

        for directory in warm_start_candidates(self.fingerprint, self.exit_layer):
            try:
                self.load_adapter(directory)
            except AdapterError as exc:
                log.warning("warm start %s does not fit this drafter (%s); trying the next", directory, exc)
                continue
            self.weight_version = 0
            self.starts_trained = True
            log.info("drafter of '%s' at exit layer %d starts from the warm start in %s", self.model_id, self.exit_layer, directory)
            return directory
        log.info(
            "no warm start fits '%s' at exit layer %d: the exit head starts untrained (make one with `dvi warmstart`)",
            self.model_id, self.exit_layer,
        )
        return None

    @property
    def native_kernels(self) -> dict | None:
        """Per matrix role, the kernels the fast engine chose for native weights (None when it runs none)."""
        return self._fast.native_kernels if self._fast is not None and self.native else None

    @property
    def weights(self) -> str:
        """"native" when the fast engine runs matrices at the model file's precision, else "dequantized"."""
        return "native" if self._fast is not None and self.native else "dequantized"

    def _parity(self) -> tuple[bool, float]:
        """(allclose, largest |logit| difference) between the model's own forward and this split's
        pieces, over a 5-token chunk then one single-token step (the two batch shapes decoding runs).
        Native matrices on the `q8` kernel are checked on the same blocks with fp32 activations
        (`FastStack.fp32_activations`): this checks the architecture; the 8-bit activations'
        own difference (O(1) logits on SmolLM2, as llama.cpp's) is logged, and bounded per matrix."""
        ids = torch.arange(3, 3 + 6, device=self.device)[None] % self.vocab_size
        with torch.no_grad():
            reference = self.model(input_ids=ids).logits.float()
            if self._fast is not None and self.native:
                with self._fast.fp32_activations():
                    mine = self._parity_logits(ids)
                q8 = (self._parity_logits(ids) - mine).abs().max()
                if float(q8) > 0:
                    log.info("'%s': 8-bit activations (q8 kernel) move the parity logits by %.3g (max |logit| %.3g)",
                             self.model_id, float(q8), float(reference.abs().max()))
            else:
                mine = self._parity_logits(ids)
        err = float((reference - mine).abs().max()) if torch.isfinite(mine).all() else float("inf")
        atol = _PARITY_ATOL.get(self.dtype, 1e-3)
        if self._fast is not None and self.native:
            atol = max(atol, _NATIVE_PARITY_SCALE * float(reference.abs().max()))
        return bool(torch.allclose(reference, mine, atol=atol, rtol=1e-3)), err

    def _parity_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, V] fp32 of ids [1, T] through shallow + deep: T - 1 rows, then one."""
        cache = self.new_cache(capacity=16)
        pos = torch.arange(ids.shape[1], device=self.device)[None]
        chunk = self.deep(self.shallow(ids[:, :-1], pos[:, :-1], cache), pos[:, :-1], cache)
        step = self.deep(self.shallow(ids[:, -1:], pos[:, -1:], cache), pos[:, -1:], cache)
        return torch.cat([chunk, step], dim=1).float()

    def _check_parity(self) -> None:
        """Refuse architectures whose forward this split does not reproduce (e.g. scaled embeddings)."""
        ok, err = self._parity()
        if not ok:
            raise ModelLoadError(
                f"'{self.model_id}' ({self.model.config.model_type}) is not supported: its split forward "
                f"differs from the model's own by {err:.3g}"
            )

    def _try_fast_engine(self) -> None:
        """Switch inference to the lean forward when this model supports it and it reproduces the
        HF forward; otherwise stay on the HF layers (logged, never an error)."""
        blocker = fast_path_blocker(self.model)
        if blocker is not None:
            log.info("'%s' decodes through the HF layers: the fast engine does not support %s", self.model_id, blocker)
            return
        self._fast = shared_fast_stack(self.model, self.native)
        self.engine = "fast"
        ok, err = self._parity()
        if not ok:
            log.warning("'%s': the fast engine differs from the HF forward by %.3g; using the HF layers", self.model_id, err)
            self._fast, self._fast_head, self.engine = None, None, "hf"

    # ------------------------------------------------------------------ caches
    def new_cache(self, capacity: int | None = None):
        """A KV cache for the L base layers (shallow slots [0, k), deep slots [k, L)); `capacity`
        is a hint of the positions it will hold (the fast engine's buffers grow past it)."""
        if self._fast is not None:
            return self._fast.new_cache(self.num_layers, capacity or DEFAULT_CACHE_CAPACITY)
        return DynamicCache(config=self.model.config)

    def new_exit_cache(self, capacity: int | None = None):
        """A one-layer KV cache for the exit adapter (slot 0)."""
        if self._fast is not None:
            return self._fast.new_cache(1, capacity or DEFAULT_CACHE_CAPACITY)
        return DynamicCache(config=self.model.config)

    # ------------------------------------------------------------------ forward pieces
    def _run_layers(self, hidden, start, stop, position_ids, cache):
        past = cache.get_seq_length(start) if cache is not None else 0
        mask = causal_mask(hidden.shape[1], past, hidden.dtype, hidden.device)
        rope = self.decoder.rotary_emb(hidden, position_ids)
        for layer in self.layers[start:stop]:
            hidden = call_layer(layer, hidden, rope, mask, position_ids, cache)
        return hidden

    @torch.no_grad()
    def shallow(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Layers [0, k) on input_ids [1, T] at position_ids [1, T]; returns h_k [1, T, H] (model dtype)."""
        if self._fast is not None:
            x = self._fast.embed(input_ids[0])
            return self._fast.run(x, 0, self.exit_layer, cache, cache.get_seq_length(0))[None]
        hidden = self.decoder.embed_tokens(input_ids)
        return self._run_layers(hidden, 0, self.exit_layer, position_ids, cache)

    @torch.no_grad()
    def deep(self, h_k: torch.Tensor, position_ids: torch.Tensor, cache, logits: bool | torch.Tensor = True):
        """Verifier: layers [k, L) + final norm + base LM head on h_k [1, T, H].

        Returns p's logits [1, T, V] float32; None when `logits` is False (cache fill only); with
        `logits` a [R] int64 tensor of row indices, the logits of those rows only, [1, R, V] (the
        LM head runs on R rows: a prefill that keeps a sample of its positions' targets).
        """
        rows = logits if isinstance(logits, torch.Tensor) else None
        if self._fast is not None:
            k = self.exit_layer
            hidden = self._fast.run(h_k[0], k, self.num_layers, cache, cache.get_seq_length(k))
            if rows is not None:
                return self._fast.logits(hidden[rows.to(hidden.device)])[None]
            return self._fast.logits(hidden)[None] if logits else None
        hidden = self._run_layers(h_k, self.exit_layer, self.num_layers, position_ids, cache)
        if rows is not None:
            hidden = hidden[:, rows.to(hidden.device)]
        elif not logits:
            return None
        return self.model.lm_head(self.decoder.norm(hidden)).float()

    @torch.no_grad()
    def step_sequences(self, tokens: list[int], caches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The verifier's next step of B sequences at once: tokens[b] is appended to the sequence
        held by caches[b] (a `new_cache`, filled up to that token's position in every layer).
        Returns (h_k [B, H] model dtype, logits [B, V] float32): each row what `shallow` and `deep`
        give for that one token alone (on the fast engine the weights are read once for all B
        rows; where its matrices compute rows alone, as the q8 kernel does, bit for bit)."""
        if not tokens or len(tokens) != len(caches):
            raise ValueError(f"step_sequences needs one cache per token, got {len(tokens)} tokens and {len(caches)} caches")
        if self._fast is not None:
            x = self._fast.embed(torch.tensor(tokens, dtype=torch.int64, device=self.device))
            h_k = self._fast.run_sequences(x, 0, self.exit_layer, caches)
            return h_k, self._fast.logits(self._fast.run_sequences(h_k, self.exit_layer, self.num_layers, caches))
        states, logits = [], []
        for token, cache in zip(tokens, caches):
            position = torch.tensor([[cache.get_seq_length(0)]], device=self.device)
            h = self.shallow(torch.tensor([[token]], device=self.device), position, cache)
            states.append(h[0])
            logits.append(self.deep(h, position, cache)[0])
        return torch.cat(states), torch.cat(logits)

    @torch.no_grad()
    def draft(self, h_k: torch.Tensor, position_ids: torch.Tensor, exit_cache) -> torch.Tensor:
        """Drafter head on h_k [1, T, H] appended to `exit_cache`: q's logits [V'] float32 of the
        last position over the draft vocabulary (entry j scores token `draft_vocab[j]`)."""
        if self._fast is not None:
            layer, head = self._merged_head()
            position = exit_cache.get_seq_length(0)
            cos, sin = self._fast.rope(position, position + h_k.shape[1])
            out = layer(h_k[0], cos, sin, exit_cache, 0, chunk_mask(h_k.shape[1], position, h_k.device))
            return head(rms_norm(out[-1:], *self._fast.norm))[0].float()
        past = exit_cache.get_seq_length(0)
        mask = causal_mask(h_k.shape[1], past, h_k.dtype, h_k.device)
        rope = self.decoder.rotary_emb(h_k, position_ids)
        logits = self._head(h_k, rope, mask, exit_cache, position_ids, logits_for=1)[0, -1].float()
        return logits if self.draft_vocab.shape[0] == self.vocab_size else logits[self.draft_vocab]

    def _merged_head(self) -> tuple[FastLayer, PackedLinear | NativeLinear]:
        """The exit head with its LoRA merged into packed weights (rebuilt after an adapter change):
        the exit layer, and the LM head rows of the draft vocabulary. Where the verifier runs
        native weights with the q8 kernel, the merged matrices are quantised to Q8_0 and run it
        too (a quarter of the bytes of fp32; the drafter may be approximate, since the verifier
        alone decides what is emitted, and each draft's q is the one its token was drawn from)."""
        if self._fast_head is None:
            with torch.no_grad():
                quantised = self._quantised_head()
                native_of = (lambda m: quantize_q8_0(lora_merged_weight(m))) if quantised else no_native
                kernels = NativeKernels("q8", "q8") if quantised else None
                # a snapshot (deepcopy): a full-rank block's weights would otherwise be shared with
                # the live parameters, and an optimiser step would reach half of the merged head
                layer = FastLayer(copy.deepcopy(self._head.exit_block()), weight_of=lora_merged_weight,
                                  native_of=native_of, kernels=kernels)
                lm_head = self._head.lm_head
                rows = lora_merged_weight(lm_head)[self.draft_vocab]
                bias = base_linear(lm_head).bias
                bias = None if bias is None else bias[self.draft_vocab]
                head = NativeLinear(quantize_q8_0(rows), bias, kernels) if quantised else PackedLinear(rows, bias)
                self._fast_head = (layer, head)
        return self._fast_head

    def _quantised_head(self) -> bool:
        """True when the merged exit head runs Q8_0 (see `_merged_head`): the verifier's layers run
        the q8 kernel and every matrix's input size is a multiple of 32."""
        kernels = self.native_kernels or {}
        return (bool(kernels) and all(k.one_row == "q8" for k in kernels.values())
                and self.hidden_size % 32 == 0 and self._fast.layers[0].intermediate % 32 == 0)

    @property
    def draft_cost(self) -> float:
        """One exit-head draft step (k shallow layers, the exit layer, the LM head rows of the draft
        vocabulary) in verifier passes (the L - k deep layers and the full LM head), by weights
        read: decoding one sequence streams the weights, so its time follows the bytes it reads
        (on the CPU measured, 0.17 measured vs 0.19 by this count for SmolLM2 at k = 4). On native
        weights it is timed instead (`_time_costs`: there bytes do not predict time), and this is
        its value at a short context (`costs` gives it at any length)."""
        return self.costs(0)[0]

    @property
    def row_cost(self) -> float:
        """What one more row adds to a verify block, in one-row verifier passes: every drafted token
        is also a row of the next verify pass. Decoding that streams its weights pays little for
        rows (the fp32 engine: a 5-row block 1.02x one row, so 0 here), but the 8-bit kernels of
        native weights do integer work per row (a 5-row block 1.37-1.41x one row on an Intel Xeon
        with today's kernels, 1.10x there with the slower one-row step of 2026-11-30; 1.4-1.7x on an
        AMD EPYC with AVX-512 VNNI, 2.4x on one with AVX2 only), so on native
        weights it is timed (`_time_costs`); this is its value at a short context (`costs` gives
        it at any length)."""
        return self.costs(0)[1]

    @property
    def probe_cost(self) -> float:
        """The exit head alone on a state the block has already computed (the exit layer and the
        LM head rows of the draft vocabulary, no shallow layers): what learning the head's
        confidence for a block's first token costs, in verifier passes (0.085 of one at a 256-token
        context on an AMD EPYC with AVX-512 VNNI, against 0.18-0.21 for a draft step, which also
        runs its token through the shallow layers: benchmarks/cost_breakdown.py --context 256).
        Counted by weights, or timed on native weights (`costs`)."""
        return self.costs(0)[2]

    def _counted_costs(self) -> tuple[float, float, float]:
        """(draft, row, probe) costs by weights read, in verifier passes (row: 0, see `row_cost`)."""
        layer = self._layer_weights
        head = self.vocab_size * self.hidden_size
        exit_head = layer + self.draft_vocab.shape[0] * self.hidden_size
        full = (self.num_layers - self.exit_layer) * layer + head
        return (self.exit_layer * layer + exit_head) / full, 0.0, exit_head / full

    COST_CONTEXTS = (64, 1024)
    """Sequence lengths at which native weights' costs are timed; `costs` interpolates between them.
    A row's attention grows with the context, the rest of a pass does not: a verify row cost 0.095
    of a one-row pass at 64 tokens and 0.197 at 1,024 on an AMD EPYC with AVX-512 VNNI, 0.29 and
    0.37 on one with AVX2 only (benchmarks/cost_breakdown.py --context N)."""

    def costs(self, length: int) -> tuple[float, float, float]:
        """(`draft_cost`, `row_cost`, `probe_cost`) of a block at a sequence of `length` tokens: on
        native weights, linear in `length` between their timings at `COST_CONTEXTS` (clamped to
        those values outside them; timed once per split, on first use); otherwise the counted
        costs (a row cost of 0), whatever the length."""
        if self.weights != "native":
            return self._counted_costs()
        if self._timed_costs is None:
            longest = min(self.COST_CONTEXTS[-1], self.max_positions - 8) if self.max_positions else self.COST_CONTEXTS[-1]
            contexts = sorted({min(c, longest) for c in self.COST_CONTEXTS})
            self._timed_costs = tuple((c, self._time_costs(context=c)) for c in contexts)
        return interpolated_costs(self._timed_costs, length)

    def use_costs(self, timed: Sequence[tuple[int, Sequence[float]]]) -> None:
        """Price blocks with these (length, (draft, row, probe)) timings instead of timing them here
        (native weights; `costs` interpolates between the first and the last): a replay or a benchmark
        that must make the same draft choices as another process uses that process's costs.
        ValueError unless lengths ascend from >= 0 and every cost is three floats >= 0."""
        points = tuple((int(n), tuple(float(x) for x in v)) for n, v in timed)
        if not points or any(n < 0 for n, _ in points) or [n for n, _ in points] != sorted({n for n, _ in points}):
            raise ValueError(f"costs need ascending, distinct lengths >= 0, got {[n for n, _ in points]}")
        if any(len(v) != 3 or min(v) < 0 for _, v in points):
            raise ValueError("each timing is (draft, row, probe) costs >= 0")
        self._timed_costs = points

    def _time_costs(self, context: int = 64, repeats: int = 5, block: int = 5) -> tuple[float, float, float]:
        """(`draft_cost`, `row_cost`, `probe_cost`) timed on native weights, each piece the fastest
        of `repeats` after a `context`-token prefill: (shallow pass + exit-head draft of one token)
        / (one-row forward through every layer and the LM head), (a `block`-row forward - the
        one-row forward) / (block - 1) / the one-row forward, floored at 0, and (the exit-head
        draft of one token on a state already computed) / the one-row forward. The pieces run interleaved, as in
        decoding, where a draft step follows a verify pass that has evicted its weights from the
        cache (timed back to back instead, a draft step measured ~35% cheaper on an AMD EPYC, its
        weights still cached). Bytes read do not predict time there: the 4-bit layers cost their
        fixed per-layer work more than their bytes, the 8-bit LM head less (on an Intel Xeon, 0.20
        by bytes against 0.11 timed)."""
        import time

        ids = torch.arange(context, device=self.device)[None] % self.vocab_size
        pos, one, at = torch.arange(context)[None], ids[:, -1:], torch.tensor([[context]])
        cache, exit_cache = self.new_cache(context + block + 1), self.new_exit_cache(context + 2)

        def fastest(*fns) -> list[float]:
            """The fastest of `repeats` runs of each fn, the fns interleaved so that they see the
            same machine (another job's load would otherwise skew one against the other)."""
            best = [float("inf")] * len(fns)
            for round_ in range(repeats + 1):  # round 0 warms every shape up and is not kept
                for i, fn in enumerate(fns):
                    start = time.perf_counter()
                    fn()
                    if round_ > 0:
                        best[i] = min(best[i], time.perf_counter() - start)
                    crop_cache(cache, context)
                    crop_cache(exit_cache, context)
            return best

        with torch.inference_mode():
            h = self.shallow(ids, pos, cache)
            self.deep(h, pos, cache, logits=False)
            self.draft(h, pos, exit_cache)
            rows, rows_at = ids[:, :block], torch.arange(context, context + block)[None]
            state = h[:, -1:]
            drafted, full, many, probed = fastest(
                lambda: self.draft(self.shallow(one, at, cache), at, exit_cache),
                lambda: self.deep(self.shallow(one, at, cache), at, cache),
                lambda: self.deep(self.shallow(rows, rows_at, cache), rows_at, cache),
                lambda: self.draft(state, at, exit_cache),
            )
        return drafted / full, max(0.0, (many - full) / (block - 1) / full), probed / full

    def adapter_changed(self) -> None:
        """Tell the split that the LoRA tensors or the draft vocabulary changed in place (an
        optimiser step): the fast engine re-merges the exit head before the next draft."""
        self._fast_head = None

    def _initial_draft_vocab(self) -> torch.Tensor:
        """All V ids, or for a reduced drafter the choice `select_draft_vocab` makes before any
        traffic: the lowest ids, EOS included (the learner replaces it with traffic counts)."""
        if not self.draft_vocab_size:
            return torch.arange(self.vocab_size, device=self.device)
        return select_draft_vocab(torch.zeros(self.vocab_size), self.draft_vocab_size, self.eos_token_ids).to(self.device)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Draft from these token ids only ([V'] int64, distinct, in [0, V)); stored ascending.
        ValueError otherwise. The verifier keeps the full vocabulary, so decoding stays lossless."""
        self.draft_vocab = checked_draft_vocab(ids, self.vocab_size).to(self.device)
        self.adapter_changed()

    def drafter_logits(self, hidden: torch.Tensor, at: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Training view of q: run the exit head causally over a whole context.

        hidden: [T, H] layer-k states of positions 0..T-1 (any float dtype); at: [N] int64 indices
        into them; rows: [V'] int64 token ids to score (None = all V). Returns logits [N, V] (or
        [N, V'], column j scoring token rows[j]) float32 with grad through the trainable tensors only.
        """
        x = hidden.to(device=self.device, dtype=self.dtype)[None]
        position_ids = torch.arange(x.shape[1], device=self.device)[None]
        mask = causal_mask(x.shape[1], 0, x.dtype, x.device)
        rope = self.decoder.rotary_emb(x, position_ids)
        out = call_layer(self._head.block, x, rope, mask, position_ids)
        picked = self._head.norm(out[0, at.to(self.device)])
        if rows is None:
            return self._head.lm_head(picked).float()
        return lm_head_rows(self._head.lm_head, picked, rows.to(self.device)).float()

    # ------------------------------------------------------------------ adapter weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.exit_head.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.exit_head.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (peft names, detached CPU copies), plus the draft vocabulary under
        DRAFT_VOCAB_KEY when it is reduced: what the weight store carries."""
        state = peft.get_peft_model_state_dict(self.exit_head, save_embedding_layers=False)
        out = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        if self.draft_vocab_size:
            out[DRAFT_VOCAB_KEY] = self.draft_vocab.detach().to("cpu").clone()
        return out

    def load_adapter_state(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Hot-swap adapter tensors (as from `adapter_state`) and set the weight version.

        A reduced-vocabulary drafter takes its draft vocabulary from DRAFT_VOCAB_KEY when present
        (an adapter saved before it had one keeps the current vocabulary). Raises AdapterError
        when a name, shape or vocabulary does not fit this drafter; nothing changes then.
        """
        tensors = dict(tensors)
        vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
        current = peft.get_peft_model_state_dict(self.exit_head, save_embedding_layers=False)
        if set(tensors) != set(current):
            missing = sorted(set(current) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(current))[:3]
            raise AdapterError(f"adapter tensors do not match this drafter (missing {missing}, unexpected {extra})")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(current[name].shape):
                raise AdapterError(
                    f"adapter tensor {name} has shape {tuple(value.shape)}, expected {tuple(current[name].shape)}"
                )
        if vocab is not None:
            size = self.draft_vocab_size
            try:
                vocab = checked_draft_vocab(vocab, self.vocab_size)
            except ValueError as exc:
                raise AdapterError(f"adapter draft vocabulary: {exc}") from None
            if vocab.numel() != size:
                raise AdapterError(f"adapter draft vocabulary holds {vocab.numel()} ids, this drafter drafts from {size or 'all'}")
        peft.set_peft_model_state_dict(self.exit_head, tensors)
        if vocab is not None:
            self.draft_vocab = vocab.to(self.device)
        self.weight_version = int(version)
        self.adapter_changed()

    def adapter_meta(self) -> dict:
        return {
            "model_id": self.model_id,
            "model_fingerprint": self.fingerprint,
            "exit_layer": self.exit_layer,
            "drafter": asdict(self.drafter_config),
            "weight_version": self.weight_version,
        } | ({"draft_vocab": self.draft_vocab.tolist()} if self.draft_vocab_size else {})

    def save_adapter(self, directory: str | Path) -> Path:
        """Write a peft adapter (adapter_config.json + adapter_model.safetensors, loadable by
        `peft.PeftModel.from_pretrained(ExitHead, dir)`) plus dvi_adapter.json with the identity
        of the base model and exit layer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.exit_head.save_pretrained(str(directory), save_embedding_layers=False)
        (directory / ADAPTER_META_FILE).write_text(json.dumps(self.adapter_meta(), indent=2))
        return directory

    def check_adapter_meta(self, meta: dict, source: str) -> None:
        if meta.get("model_fingerprint") != self.fingerprint:
            raise AdapterError(
                f"{source} was trained for model '{meta.get('model_id')}', not '{self.model_id}'"
            )
        if int(meta.get("exit_layer", -1)) != self.exit_layer:
            raise AdapterError(
                f"{source} was trained for exit layer {meta.get('exit_layer')}, this drafter exits at {self.exit_layer}"
            )
        theirs = meta.get("drafter", {})
        mine = asdict(self.drafter_config)
        for key in ("exit_init_layer", "lora_rank", "adapt_lm_head", "full_rank_exit_layer"):
            if key in theirs and theirs[key] != mine[key]:
                raise AdapterError(f"{source} has {key}={theirs[key]}, this drafter has {mine[key]}")
        size = int(theirs.get("draft_vocab_size", 0) or 0)
        if effective_draft_vocab_size(size, self.vocab_size) != self.draft_vocab_size:
            raise AdapterError(f"{source} drafts from {size or 'all'} tokens, this drafter from {self.draft_vocab_size or 'all'}")

    def load_adapter(self, directory: str | Path) -> None:
        """Load an adapter saved by `save_adapter`; AdapterError (nothing changed) if it is missing,
        corrupt, or belongs to another model or exit layer."""
        meta, tensors = read_adapter_dir(directory)
        self.check_adapter_meta(meta, str(directory))
        self.load_adapter_state(tensors, int(meta.get("weight_version", 0)))
        self.starts_trained = True


def read_adapter_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(dvi_adapter.json, adapter tensors with the draft vocabulary if it lists one) of a
    `save_adapter` directory; AdapterError naming the file when one is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / ADAPTER_META_FILE
    weights_path = directory / "adapter_model.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{directory} is not a dvi adapter (needs {ADAPTER_META_FILE} and adapter_model.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{meta_path} is corrupt: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{meta_path} is corrupt: expected a JSON object")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights_path} is corrupt: {exc}") from None
    return meta, with_draft_vocab(tensors, meta, str(meta_path))


def lora_merged_weight(module: nn.Module) -> torch.Tensor:
    """The weight [out, in] a linear applies: its own, plus peft's delta (B A * scale) for every
    active LoRA adapter when peft wrapped it."""
    if not isinstance(module, peft.tuners.lora.LoraLayer):
        return module.weight.detach()
    weight = module.get_base_layer().weight.detach()
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name).detach()
    return weight


def interpolated_costs(timed: Sequence[tuple[int, Sequence[float]]], length: int) -> tuple[float, ...]:
    """Costs at a sequence of `length` tokens from (length, costs) timings sorted by length: linear
    between the first and the last timing, clamped to them outside (`SplitModel.costs`)."""
    (short, at_short), (long, at_long) = timed[0], timed[-1]
    t = 0.0 if long == short else min(1.0, max(0.0, (length - short) / (long - short)))
    return tuple(a + t * (b - a) for a, b in zip(at_short, at_long))


def lm_head_rows(head: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [N, H] through the output rows `rows` [V'] of a (possibly peft LoRA-wrapped) linear head:
    [N, V'], equal to head(x)[:, rows] with the same gradient, at about V'/V of the base's cost.
    A vanilla LoRA adapter adds peft's own low-rank path on those rows only, lora_A(x) through
    lora_B's rows `rows`, times scaling (never the [V, H] delta, nor lora_B's [N, V] output: those,
    and their gradients, cost more than the sliced head); a LoRA variant (DoRA, ...) adds its
    `get_delta_weight` rows. A head with LoRA dropout runs in full, then is sliced. A frozen base
    weight's rows are gathered once per (weight, rows) and reused (`_frozen_rows`)."""
    if not isinstance(head, peft.tuners.lora.LoraLayer):
        return nn.functional.linear(x, _frozen_rows(head, rows), None if head.bias is None else head.bias[rows])
    if any(not isinstance(d, nn.Identity) for d in head.lora_dropout.values()):
        return head(x)[:, rows]
    base = head.get_base_layer()
    active = [name for name in head.active_adapters if name in head.lora_A]
    weight = _frozen_rows(base, rows)
    for name in active:
        if name in head.lora_variant:
            weight = weight + head.get_delta_weight(name)[rows]
    out = nn.functional.linear(x, weight, None if base.bias is None else base.bias[rows])
    for name in active:
        if name not in head.lora_variant:
            lora_a, lora_b = head.lora_A[name], head.lora_B[name]
            a = lora_a(x.to(lora_a.weight.dtype))
            low_rank = nn.functional.linear(a, lora_b.weight[rows], None if lora_b.bias is None else lora_b.bias[rows])
            out = out + (low_rank * head.scaling[name]).to(out.dtype)
    return out


_FROZEN_ROWS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _frozen_rows(linear: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """linear.weight[rows]; for a weight without gradient, gathered once and reused while neither
    the weight (same storage, no in-place change) nor `rows` changes: a training step would
    otherwise copy and free [V', H] of it (19 MB for SmolLM2's 8,192 draft rows) every time."""
    weight = linear.weight
    if weight.requires_grad:
        return weight[rows]
    state = (weight.data_ptr(), weight._version)
    cached = _FROZEN_ROWS.get(linear)
    if cached is not None and cached[0] == state and torch.equal(cached[1], rows):
        return cached[2]
    gathered = weight[rows].detach()
    _FROZEN_ROWS[linear] = (state, rows.detach().clone(), gathered)
    return gathered


def with_draft_vocab(tensors: dict[str, torch.Tensor], meta: dict, source: str) -> dict[str, torch.Tensor]:
    """Adapter tensors read from adapter_model.safetensors, plus the draft vocabulary that
    dvi_adapter.json (`meta`) lists, if any, under DRAFT_VOCAB_KEY. AdapterError if it is not a
    list of ints."""
    vocab = meta.get("draft_vocab")
    if vocab is None:
        return tensors
    if not isinstance(vocab, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab):
        raise AdapterError(f"{source} is corrupt: draft_vocab must be a list of token ids")
    return {**tensors, DRAFT_VOCAB_KEY: torch.tensor(vocab, dtype=torch.int64)}


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids HF `generate` stops at: generation_config.eos_token_id, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
