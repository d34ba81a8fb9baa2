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
import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import peft
import torch
from torch import nn
from transformers import DynamicCache

from common.config import DrafterConfig, ModelSpec
from common.errors import AdapterError, ModelLoadError
from common.models import load_model_and_tokenizer

log = logging.getLogger(__name__)

ADAPTER_META_FILE = "dvi_adapter.json"
_PARITY_ATOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}


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


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cached position >= `length` in every layer of `cache` (no-op where shorter)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel() and layer.keys.shape[-2] > length:
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def call_layer(layer: nn.Module, hidden, rope, mask=None, position_ids=None, cache=None) -> torch.Tensor:
    """One HF decoder layer on hidden [B, T, H]; appends to `cache` when given. Returns [B, T, H]."""
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=cache is not None,
        position_embeddings=rope,
    )
    return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple


class ExitHead(nn.Module):
    """q's head: exit adapter layer -> final norm -> LM head, over layer-k hidden states.

    forward(hidden [B, T, H], position_embeddings (cos, sin), attention_mask, cache, logits_for)
    -> logits [B, T', V] where T' = T, or the last `logits_for` positions only.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.layer = layer
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden, position_embeddings, attention_mask=None, cache=None, position_ids=None, logits_for=None):
        out = call_layer(self.layer, hidden, position_embeddings, attention_mask, position_ids, cache)
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


class SplitModel:
    """A frozen base model cut at `exit_layer`, with a LoRA-adapted exit head.

    Attributes: model (frozen HF causal LM), tokenizer, drafter_config, exit_layer (k),
    num_layers (L), vocab_size (V), hidden_size (H), weight_version (int, version of the adapter
    now loaded), exit_head (the peft-wrapped ExitHead), eos_token_ids (set[int]).
    """

    def __init__(self, model, tokenizer, drafter_config: DrafterConfig, model_id: str):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if decoder is None or not all(hasattr(decoder, name) for name in needed):
            raise ModelLoadError(
                f"'{model_id}' ({type(model).__name__}) has no Llama-style decoder stack "
                "(embed_tokens, layers, norm, rotary_emb); dvi cannot split it"
            )
        if getattr(model, "lm_head", None) is None:
            raise ModelLoadError(f"'{model_id}' has no lm_head; dvi needs a causal LM")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.decoder = decoder
        self.layers = list(decoder.layers)
        self.num_layers = len(self.layers)
        drafter_config.validate_for(self.num_layers)
        self.drafter_config = drafter_config
        self.exit_layer = drafter_config.exit_layer
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.fingerprint = model_fingerprint(model)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.weight_version = 0

        init_layer = drafter_config.init_layer_for(self.num_layers)
        exit_layer = copy.deepcopy(self.layers[init_layer])
        exit_layer.self_attn.layer_idx = 0  # it owns a one-layer cache of its own
        head = ExitHead(exit_layer, decoder.norm, model.lm_head)
        targets = [
            name
            for name, module in head.named_modules()
            if isinstance(module, nn.Linear) and (name != "lm_head" or drafter_config.adapt_lm_head)
        ]
        lora = peft.LoraConfig(
            r=drafter_config.lora_rank,
            lora_alpha=drafter_config.lora_alpha,
            lora_dropout=drafter_config.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        self.exit_head = peft.get_peft_model(head, lora)
        self._head: ExitHead = self.exit_head.base_model.model  # LoRA layers live inside it
        self.exit_head.eval()
        for name, param in self.exit_head.named_parameters():
            param.requires_grad_("lora_" in name)
        self._check_parity()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, spec: ModelSpec) -> "SplitModel":
        model, tokenizer = load_model_and_tokenizer(spec.model, spec.dtype, spec.device)
        return cls(model, tokenizer, spec.drafter, spec.model)

    def _check_parity(self) -> None:
        """Refuse architectures whose forward this split does not reproduce (e.g. scaled embeddings)."""
        ids = torch.arange(3, 3 + 6, device=self.device)[None] % self.vocab_size
        with torch.no_grad():
            reference = self.model(input_ids=ids).logits.float()
            cache = self.new_cache()
            pos = torch.arange(ids.shape[1], device=self.device)[None]
            mine = self.deep(self.shallow(ids, pos, cache), pos, cache).float()
        if not torch.allclose(reference, mine, atol=_PARITY_ATOL.get(self.dtype, 1e-3), rtol=1e-3):
            err = (reference - mine).abs().max().item()
            raise ModelLoadError(
                f"'{self.model_id}' ({self.model.config.model_type}) is not supported: its split forward "
                f"differs from the model's own by {err:.3g}"
            )

    # ------------------------------------------------------------------ caches
    def new_cache(self) -> DynamicCache:
        """A KV cache for the L base layers (shallow slots [0, k), deep slots [k, L))."""
        return DynamicCache(config=self.model.config)

    def new_exit_cache(self) -> DynamicCache:
        """A one-layer KV cache for the exit adapter (slot 0)."""
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
    def shallow(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Layers [0, k) on input_ids [1, T] at position_ids [1, T]; returns h_k [1, T, H] (model dtype)."""
        hidden = self.decoder.embed_tokens(input_ids)
        return self._run_layers(hidden, 0, self.exit_layer, position_ids, cache)

    @torch.no_grad()
    def deep(self, h_k: torch.Tensor, position_ids: torch.Tensor, cache: DynamicCache, logits: bool = True):
        """Verifier: layers [k, L) + final norm + base LM head on h_k [1, T, H].

        Returns p's logits [1, T, V] float32, or None when `logits` is False (cache fill only).
        """
        hidden = self._run_layers(h_k, self.exit_layer, self.num_layers, position_ids, cache)
        if not logits:
            return None
        return self.model.lm_head(self.decoder.norm(hidden)).float()

    @torch.no_grad()
    def draft(self, h_k: torch.Tensor, position_ids: torch.Tensor, exit_cache: DynamicCache) -> torch.Tensor:
        """Drafter head on h_k [1, T, H] appended to `exit_cache`; q's logits [V] float32 of the last position."""
        past = exit_cache.get_seq_length(0)
        mask = causal_mask(h_k.shape[1], past, h_k.dtype, h_k.device)
        rope = self.decoder.rotary_emb(h_k, position_ids)
        return self._head(h_k, rope, mask, exit_cache, position_ids, logits_for=1)[0, -1].float()

    def drafter_logits(self, hidden: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Training view of q: run the exit head causally over a whole context.

        hidden: [T, H] layer-k states of positions 0..T-1 (any float dtype); at: [N] int64 indices
        into them. Returns logits [N, V] float32 with grad through the LoRA parameters only.
        """
        x = hidden.to(device=self.device, dtype=self.dtype)[None]
        position_ids = torch.arange(x.shape[1], device=self.device)[None]
        mask = causal_mask(x.shape[1], 0, x.dtype, x.device)
        rope = self.decoder.rotary_emb(x, position_ids)
        out = call_layer(self._head.layer, x, rope, mask, position_ids)
        picked = out[0, at.to(self.device)]
        return self._head.lm_head(self._head.norm(picked)).float()

    # ------------------------------------------------------------------ adapter weights
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.exit_head.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.exit_head.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors (peft names, detached CPU copies): what the weight store carries."""
        state = peft.get_peft_model_state_dict(self.exit_head, save_embedding_layers=False)
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Hot-swap adapter tensors (as from `adapter_state`) and set the weight version.

        Raises AdapterError when a name or shape does not match this drafter; nothing changes then.
        """
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
        peft.set_peft_model_state_dict(self.exit_head, tensors)
        self.weight_version = int(version)

    def adapter_meta(self) -> dict:
        return {
            "model_id": self.model_id,
            "model_fingerprint": self.fingerprint,
            "exit_layer": self.exit_layer,
            "drafter": asdict(self.drafter_config),
            "weight_version": self.weight_version,
        }

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
        for key in ("exit_init_layer", "lora_rank", "adapt_lm_head"):
            if key in theirs and theirs[key] != mine[key]:
                raise AdapterError(f"{source} has {key}={theirs[key]}, this drafter has {mine[key]}")

    def load_adapter(self, directory: str | Path) -> None:
        """Load an adapter saved by `save_adapter`; AdapterError (nothing changed) if it is missing,
        corrupt, or belongs to another model or exit layer."""
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
        self.check_adapter_meta(meta, str(directory))
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterError(f"{weights_path} is corrupt: {exc}") from None
        self.load_adapter_state(tensors, int(meta.get("weight_version", 0)))


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
