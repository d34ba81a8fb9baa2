"""Wall-clock speed of greedy decoding methods on Spec-Bench-format prompts (`dvi bench speed`).

Measurement, as Spec-Bench does it and avoiding the reference code's mistakes (trap 7):
  * batch 1, greedy; every method stops at EOS and at `max_new_tokens` with the same settings;
  * every run is timed the same way: `time.perf_counter` around the generate call only (CUDA is
    synchronised on both sides), with nothing purged inside the timed region;
  * warm-up prompts go through every method first and are not recorded; a method that learns
    from the requests it serves (our decoder's traffic drafting) then forgets them, so that the
    timed run of a warm-up prompt is not drafted from that prompt's own earlier output;
  * methods are interleaved per prompt and their order rotates from one prompt to the next, so a
    slow drift of the machine (clock boost, a neighbour's job) falls on every method alike.

A method is a callable `prompt_ids -> (new_token_ids, verifier_passes | None)`, which may also
have a `forget()` (called after the warm-up); the table of methods is a plain dict, so a new
drafter variant is one more entry.

Fields of a result row (one per method x category, plus category "overall"):
  tokens_per_s      total new tokens / total seconds over the row's prompts (ratio of totals);
  speedup_vs_hf_ar  tokens_per_s / hf_ar's tokens_per_s on the same prompts (ratio of totals).
                    Spec-Bench divides mean per-prompt speeds instead; `spec_bench_speedups`
                    computes that figure and the markdown report shows both;
  tau               new tokens / verifier passes, pooled over the row's prompts (1.0 for AR,
                    None where a method's passes are unknown); also written as `mean_accepted`,
                    its old name, for one release;
  identical_to_ar   fraction of the row's prompts whose tokens equal their reference's, token
                    for token (`identity_references`): our own methods on native-precision weights
                    against `ar` on the same weights (the lossless guarantee; `ar` itself and
                    every HF method against hf_ar, which runs the dequantised fp32 weights:
                    that agreement is reported, not required), llama_cpp_lookup against llama_cpp.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig, ModelSpec
from common.core.prompts import SkippedRequest, skipped_summary
from learner.local import LocalLoopConfig
from dvi.bench.peers import PEER_METHODS

REFERENCE = "hf_ar"
BUILTIN_METHODS: tuple[str, ...] = ("hf_ar", "ar", "hf_prompt_lookup", "hf_early_exit", "dvi_context", "dvi")
"""The default methods; PEER_METHODS (llama.cpp, an optional extra) run when --methods names them."""
HF_METHODS = frozenset({"hf_ar", "hf_prompt_lookup", "hf_early_exit"})
CONTEXT_ONLY = "dvi_context"
"""Our decoder drafting from the context only (the exit head off): the bar the learned drafter must
clear. Its context includes traffic drafting (earlier requests' n-grams, DecodeConfig.traffic_drafting),
as `dvi`'s does, so the ratio of the two is what the exit head adds."""
OVERALL = "overall"
PROMPT_LOOKUP_NUM_TOKENS = 10
ROW_FIELDS = (
    "method", "category", "prompts", "tokens", "seconds",
    "tokens_per_s", "speedup_vs_hf_ar", "tau", "identical_to_ar",
)
RENAMED_ROW_FIELDS = {"mean_accepted": "tau"}
"""Old row field -> its new name; rows carry both for one release (readers take either)."""


def with_renamed_fields(rows: list[dict]) -> list[dict]:
    """`rows` as written to JSON: each also under its old field names (`RENAMED_ROW_FIELDS`)."""
    return [{**row, **{old: row[new] for old, new in RENAMED_ROW_FIELDS.items() if new in row}} for row in rows]
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")

MethodFn = Callable[[list[int]], "tuple[list[int], int | None]"]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SpeedSettings:
    """What one `dvi bench speed` run measures."""

    prompts: str
    """Spec-Bench-format JSONL file; only the first turn of each question is used."""
    model: str = DEFAULT_MODEL
    """Alias, local HF directory or hub id of the base model."""
    limit: int | None = None
    """Use only the first `limit` prompts (None = all)."""
    per_category: int | None = None
    """Use the first N prompts of each Spec-Bench task (None = all)."""
    max_new_tokens: int = 128
    """Most new tokens per prompt for every method (Spec-Bench uses 1024 on GPU)."""
    exit_layer: int = DrafterConfig.exit_layer
    """k: the drafter of `dvi` and of `hf_early_exit` runs layers [0, k)."""
    gamma: int = DecodeConfig.gamma
    """Most tokens drafted per block by `dvi` and by `hf_early_exit`."""
    confidence_threshold: float = DecodeConfig.confidence_threshold
    """Drafting stops when the drafter's top-1 probability falls below this (dvi and hf_early_exit)."""
    context_tokens: int = DecodeConfig.context_tokens
    """Most tokens a dvi block drafts from the context (0 = the exit head only)."""
    context_min_ngram: int = DecodeConfig.context_min_ngram
    """Shortest suffix n-gram a context draft matches."""
    draft_vocab_size: int = DrafterConfig.draft_vocab_size
    """The dvi drafter's vocabulary (0 = full); learned from the training half when `learn` is set."""
    engine: str = "fast"
    """Inference forward of our own methods (ar, dvi): fast or hf."""
    learn: tuple[str, ...] = ()
    """Schedules (kl-only, kl-rl, rl-only) to train online before timing: each starts from the
    `dvi` method's drafter (the product's default unless `adapter`), serves the first half of every
    category's prompts and learns as it goes, and is timed as method dvi_<schedule> on the second
    half, next to that drafter frozen (`dvi`) and the context drafting alone (`dvi_context`)."""
    learn_updates_per_request: int = 4
    """Optimiser steps after each learning request."""
    learn_lr: float | None = None
    """AdamW lr of every trainable tensor while learning; None: LearnerConfig's (the service's) rates."""
    learn_batch_tokens: int = 256
    """Scored positions per optimiser step while learning."""
    learn_publish_every: int = LocalLoopConfig.publish_every
    """Optimiser steps between weight versions while learning (each may re-pick the draft vocabulary)."""
    adapter: str | None = None
    """Trained drafter adapter directory for `dvi` (None = the drafter `SplitModel` loads by default)."""
    variants: tuple[tuple[str, str], ...] = ()
    """Extra dvi methods as (name, adapter directory) pairs, run after `methods`."""
    methods: tuple[str, ...] = BUILTIN_METHODS
    """Built-in methods to run, in this order; must include hf_ar, the reference."""
    truncate_prompts: bool = False
    """A prompt too long for the context with max_new_tokens: keep its last tokens (False: skip it)."""
    warmup: int = 3
    """Prompts run through every method before timing starts (not recorded)."""
    dtype: str = "float32"
    """Torch dtype of the base model."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda:0."""
    weights: str = ModelSpec.weights
    """Precision of our own methods' weights for a GGUF model: native (the file's Q4_1/Q8_0
    blocks) or dequantized (fp32); HF's methods always run the dequantised fp32 model."""
    held_out: bool = False
    """Time only the held-out half of the prompts (the half `--learn` never trains on), before
    --per-category and --limit pick from it. Not with `learn`, which makes that split itself."""
    threads: int | None = None
    """CPU threads of every method (torch's and llama.cpp's); None = torch's current setting."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.exit_layer < 1:
            raise ValueError(f"--exit-layer must be >= 1, got {self.exit_layer}")
        if self.gamma < 0 or (self.gamma == 0 and self.context_tokens == 0):
            raise ValueError(f"--gamma must be >= 1 (gamma 0 without --context-tokens is the `ar` method), got {self.gamma}")
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"--confidence-threshold must be in [0, 1], got {self.confidence_threshold}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        unknown = [m for m in self.methods if m not in BUILTIN_METHODS + PEER_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(BUILTIN_METHODS + PEER_METHODS)}")
        ModelSpec(model=self.model, dtype=self.dtype, device=self.device, engine=self.engine, weights=self.weights)
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {', '.join(self.methods)}")
        if REFERENCE not in self.methods:
            raise ValueError(f"--methods must include {REFERENCE}, the reference every speedup is measured against")
        if self.adapter is not None and "dvi" not in self.methods:
            raise ValueError("--adapter is the drafter of the `dvi` method, which --methods leaves out")
        if CONTEXT_ONLY in self.methods and self.context_tokens == 0:
            raise ValueError(f"{CONTEXT_ONLY} drafts from the context only: it needs --context-tokens >= 1")
        DecodeConfig(gamma=self.gamma, context_tokens=self.context_tokens, context_min_ngram=self.context_min_ngram,
                     confidence_threshold=self.confidence_threshold)  # the same checks, one place
        if self.draft_vocab_size < 0:
            raise ValueError(f"--draft-vocab-size must be >= 0, got {self.draft_vocab_size}")
        if self.engine not in ("fast", "hf"):
            raise ValueError(f"--engine must be fast or hf, got {self.engine!r}")
        from learner.config import SCHEDULE_KINDS

        for kind in self.learn:
            if kind not in SCHEDULE_KINDS:
                raise ValueError(f"--learn: unknown schedule {kind!r}: use {', '.join(SCHEDULE_KINDS)}")
        if len(set(self.learn)) != len(self.learn):
            raise ValueError("--learn names a schedule twice")
        if self.learn and self.held_out:
            raise ValueError("--held-out with --learn would learn on half of the held-out half: --learn already splits "
                             "the prompts (each task's first half learns, its second half is timed), so drop --held-out")
        for name in ("learn_updates_per_request", "learn_batch_tokens", "learn_publish_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learn_lr is not None and not self.learn_lr > 0:
            raise ValueError(f"--learn-lr must be > 0, got {self.learn_lr}")
        seen = set(self.methods) | {learned_name(kind) for kind in self.learn}
        for name, directory in self.variants:
            if not _NAME.match(name):
                raise ValueError(f"variant name {name!r} must start with a letter and hold only letters, digits, _ . -")
            if name in BUILTIN_METHODS + PEER_METHODS or name in seen:
                raise ValueError(f"variant name {name!r} is already a method")
            if not directory:
                raise ValueError(f"variant {name!r} needs an adapter directory (NAME=ADAPTER_DIR)")
            seen.add(name)

    @property
    def all_methods(self) -> tuple[str, ...]:
        """Every method run, in table order: the built-ins, the learned drafters, then the variants."""
        return self.methods + tuple(learned_name(k) for k in self.learn) + tuple(name for name, _ in self.variants)

    def decode_config(self) -> DecodeConfig:
        """How every dvi method decodes (`dvi_context`: the same with gamma 0)."""
        return DecodeConfig(
            gamma=self.gamma, max_new_tokens=self.max_new_tokens, confidence_threshold=self.confidence_threshold,
            context_tokens=self.context_tokens, context_min_ngram=self.context_min_ngram,
        )

    def drafter_config(self) -> DrafterConfig:
        return DrafterConfig(exit_layer=self.exit_layer, draft_vocab_size=self.draft_vocab_size)


def learned_name(schedule: str) -> str:
    """The method name of a drafter trained online with `schedule` (dvi_kl-only, dvi_kl-rl, ...)."""
    return f"dvi_{schedule}"


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class BenchPrompt:
    """One encoded prompt. category is the Spec-Bench task (multi_turn, translation, ...)."""

    index: int
    question_id: str
    category: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class RunRecord:
    """One timed run of one method on one prompt."""

    method: str
    prompt_index: int
    question_id: str
    category: str
    token_ids: tuple[int, ...]
    seconds: float
    verifier_passes: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


# --------------------------------------------------------------------------- methods
class PassCounter:
    """Counts forward calls of one module: hooked on the last decoder layer it counts verifier
    passes of HF's generate (one per step; HF's early-exit drafts stop before that layer and
    prompt lookup drafts without the model)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def hf_stop_kwargs(split) -> dict:
    """EOS and pad ids passed explicitly to HF generate: the same EOS set our decoder stops at."""
    eos = sorted(split.eos_token_ids)
    pad = split.tokenizer.pad_token_id if split.tokenizer is not None else None
    if pad is None:
        pad = eos[0] if eos else 0
    return {"eos_token_id": eos or None, "pad_token_id": int(pad)}


def hf_early_exit_settings(settings: SpeedSettings) -> dict:
    """HF generation-config fields that make HF's early-exit assistant draft like `dvi` does.

    Quirk (transformers 5.x): the early-exit assistant is the model itself and reads its drafting
    settings from `model.generation_config`, not from generate()'s kwargs, so
    `generate(num_assistant_tokens=...)` is silently ignored. HF's defaults there (20 tokens, a
    confidence stop at 0.4) would compare a different drafting rule, so `configure_hf_early_exit`
    sets on the model: at most `gamma` tokens per block, a constant schedule (the "heuristic" one
    carries state from one call to the next), and dvi's confidence stop (0 = off; when on, HF
    keeps the low-confidence token as a last draft where dvi drops it).
    """
    return {
        "num_assistant_tokens": int(settings.gamma),
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": float(settings.confidence_threshold),
    }


def configure_hf_early_exit(model, settings: SpeedSettings) -> None:
    """Apply `hf_early_exit_settings` to `model.generation_config` (see the quirk there)."""
    for key, value in hf_early_exit_settings(settings).items():
        setattr(model.generation_config, key, value)


def _hf_method(model, device, counter: PassCounter, kwargs: dict) -> MethodFn:
    def run(prompt_ids: list[int]) -> tuple[list[int], int | None]:
        ids = torch.tensor([prompt_ids], device=device)
        counter.count = 0
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[0, len(prompt_ids):].tolist(), counter.count

    return run


class DecoderMethod:
    """A method that decodes with our own loop (`SpeculativeDecoder`) on `split`; `forget()` drops
    what its traffic index learned from the requests served so far."""

    def __init__(self, split, config: DecodeConfig):
        from common.decoding.speculative import SpeculativeDecoder

        self.decoder, self.config = SpeculativeDecoder(split), config

    def __call__(self, prompt_ids: list[int]) -> tuple[list[int], int | None]:
        result = self.decoder.generate(prompt_ids, self.config)
        return result.token_ids, result.verifier_passes

    def forget(self) -> None:
        from common.core.traffic_draft import TrafficIndex

        self.decoder.traffic = TrafficIndex(self.decoder.traffic.config)


def build_methods(split, settings: SpeedSettings, counter: PassCounter, drafters: dict) -> dict[str, MethodFn]:
    """The method table, in `settings.all_methods` order.

    split: the SplitModel whose base model every method decodes with; counter: a PassCounter on
    its last decoder layer; drafters: dvi method name (as in `settings.all_methods`) -> SplitModel
    carrying that method's adapter (sharing `split.model`). Sets HF's early-exit drafting settings
    on the model when that method is asked for (see `configure_hf_early_exit`).
    """
    model, device = split.model, split.device
    stop = dict(do_sample=False, max_new_tokens=settings.max_new_tokens, **hf_stop_kwargs(split))
    makers: dict[str, Callable[[], MethodFn]] = {
        "hf_ar": lambda: _hf_method(model, device, counter, stop),
        "ar": lambda: DecoderMethod(split, DecodeConfig.autoregressive(settings.max_new_tokens)),
        "hf_prompt_lookup": lambda: _hf_method(
            model, device, counter, {**stop, "prompt_lookup_num_tokens": PROMPT_LOOKUP_NUM_TOKENS}
        ),
        "hf_early_exit": lambda: _hf_method(model, device, counter, {**stop, "assistant_early_exit": settings.exit_layer}),
        CONTEXT_ONLY: lambda: DecoderMethod(split, replace(settings.decode_config(), gamma=0)),
    }
    threads = settings.threads or torch.get_num_threads()
    for name in PEER_METHODS:
        makers[name] = lambda name=name: _peer_method(split, settings, threads, lookup=name.endswith("_lookup"))
    dvi_config = settings.decode_config()
    for name, drafter in drafters.items():
        makers[name] = lambda drafter=drafter: DecoderMethod(drafter, dvi_config)
    missing = [m for m in settings.all_methods if m not in makers]
    if missing:
        raise ValueError(f"no drafter given for method(s) {missing}")
    if "hf_early_exit" in settings.all_methods:
        configure_hf_early_exit(model, settings)
    return {name: makers[name]() for name in settings.all_methods}


def _peer_method(split, settings: SpeedSettings, threads: int, lookup: bool) -> MethodFn:
    from common.model.loading import gguf_file
    from dvi.bench.peers import llama_cpp_method

    path = gguf_file(settings.model)
    if path is None:
        raise ValueError(f"methods {', '.join(PEER_METHODS)} run the model's GGUF file; '{settings.model}' has none")
    return llama_cpp_method(path, threads, settings.max_new_tokens, split.eos_token_ids, lookup=lookup,
                            context=split.max_positions or 8192)


def identity_references(methods: list[str], native: bool) -> dict[str, str]:
    """The method each method's output is compared with, token for token (`identical_to_ar`).

    Our methods on native weights are compared with `ar` on the same weights when `ar` ran (the
    losslessness that holds by construction); everything else, `ar` included, with hf_ar (HF
    generate on the dequantised fp32 model), and llama_cpp_lookup with llama_cpp when it ran."""
    refs = {}
    for method in methods:
        ours = method not in HF_METHODS and method not in PEER_METHODS
        if ours and native and method != "ar" and "ar" in methods:
            refs[method] = "ar"
        elif method == "llama_cpp_lookup" and "llama_cpp" in methods:
            refs[method] = "llama_cpp"
        else:
            refs[method] = REFERENCE
    return refs


@contextmanager
def quiet_hf_nested_generate() -> Iterator[None]:
    """Drop one transformers warning that HF's own assisted decoding triggers (its assistant calls
    generate with a generation_config and kwargs together); everything else still shows."""

    def keep(record: logging.LogRecord) -> bool:
        return "together with generation-related" not in record.getMessage()

    logger = logging.getLogger("transformers.generation.utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


# --------------------------------------------------------------------------- running
def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def method_order(names: list[str], prompt_index: int) -> list[str]:
    """The order methods run on prompt `prompt_index`: rotated by one each prompt."""
    shift = prompt_index % len(names) if names else 0
    return names[shift:] + names[:shift]


def timed_run(fn: MethodFn, prompt_ids: list[int], device) -> tuple[list[int], int | None, float]:
    """(new token ids, verifier passes, seconds): wall clock around the generate call only."""
    _synchronize(device)
    started = time.perf_counter()
    token_ids, passes = fn(prompt_ids)
    _synchronize(device)
    return list(token_ids), passes, time.perf_counter() - started


def run_benchmark(
    methods: dict[str, MethodFn],
    prompts: list[BenchPrompt],
    warmup: int,
    device="cpu",
    on_step: Callable[[str, BenchPrompt, str], None] | None = None,
) -> list[RunRecord]:
    """Warm up on the first `warmup` prompts (unrecorded), then run every method on every prompt,
    interleaved with a rotating order. `on_step(phase, prompt, method)` is called after each run
    with phase "warmup" or "timed"."""
    names = list(methods)
    records: list[RunRecord] = []
    with torch.inference_mode():
        for prompt in prompts[:warmup]:
            for name in names:
                timed_run(methods[name], list(prompt.ids), device)
                if on_step is not None:
                    on_step("warmup", prompt, name)
        for method in methods.values():
            forget = getattr(method, "forget", None)
            if forget is not None:
                forget()
        for prompt in prompts:
            for name in method_order(names, prompt.index):
                token_ids, passes, seconds = timed_run(methods[name], list(prompt.ids), device)
                records.append(
                    RunRecord(name, prompt.index, prompt.question_id, prompt.category, tuple(token_ids), seconds, passes)
                )
                if on_step is not None:
                    on_step("timed", prompt, name)
    return records


def drafter_agreement(drafters: dict, prompts: list[BenchPrompt], records: list[RunRecord]) -> dict[str, float]:
    """Held-out top-1 agreement of each drafter's exit head with the verifier (common/decoding/agreement.py):
    at every position of each timed prompt followed by the reference's output (the model's own
    greedy continuation), ungated. drafters: method name -> SplitModel on one base model."""
    from common.decoding.agreement import agreement, verifier_targets

    if not drafters:
        return {}
    output = {r.prompt_index: r.token_ids for r in records if r.method == REFERENCE}
    sequences = [list(p.ids) + list(output[p.index]) for p in prompts if p.index in output]
    targets = verifier_targets(next(iter(drafters.values())), sequences, 0)  # the verifier is shared
    return {name: agreement(split, targets).rate for name, split in drafters.items()}


# --------------------------------------------------------------------------- aggregation (pure)
def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def aggregate(records: list[RunRecord], reference: str = REFERENCE,
              identity: dict[str, str] | None = None) -> list[dict]:
    """Rows (dicts with exactly ROW_FIELDS), category "overall" first, then categories in the
    order they first appear; within a category, methods in the order they first appear.

    Ratios are of totals over the row's prompts (see the module docstring). `identity` maps a
    method to the method its tokens are compared with (default: `reference` for all). Fields that
    cannot be computed (no reference runs, unknown verifier passes, zero time) are None.
    """
    methods = _ordered(r.method for r in records)
    categories = [OVERALL] + _ordered(r.category for r in records)
    identity = identity or {}
    tokens_of = {(r.method, r.prompt_index): r.token_ids for r in records}

    def select(method: str, category: str) -> list[RunRecord]:
        return [r for r in records if r.method == method and category in (OVERALL, r.category)]

    def speed(rows: list[RunRecord]) -> float | None:
        seconds = sum(r.seconds for r in rows)
        return sum(r.tokens for r in rows) / seconds if rows and seconds > 0 else None

    out: list[dict] = []
    for category in categories:
        reference_speed = speed(select(reference, category))
        for method in methods:
            rows = select(method, category)
            if not rows:
                continue
            tokens = sum(r.tokens for r in rows)
            passes = [r.verifier_passes for r in rows]
            against = identity.get(method, reference)
            known = [r for r in rows if (against, r.prompt_index) in tokens_of]
            tokens_per_s = speed(rows)
            out.append({
                "method": method,
                "category": category,
                "prompts": len(rows),
                "tokens": tokens,
                "seconds": sum(r.seconds for r in rows),
                "tokens_per_s": tokens_per_s,
                "speedup_vs_hf_ar": _ratio(tokens_per_s, reference_speed),
                "tau": tokens / sum(passes) if None not in passes and sum(passes) > 0 else None,
                "identical_to_ar": (
                    sum(r.token_ids == tokens_of[(against, r.prompt_index)] for r in known) / len(known) if known else None
                ),
            })
    return out


def spec_bench_speedups(records: list[RunRecord], reference: str = REFERENCE) -> dict[tuple[str, str], float | None]:
    """Spec-Bench's speedup per (method, category): mean per-prompt speed (tokens / seconds of
    each run) divided by the reference's mean per-prompt speed on the same category."""

    def mean_speed(method: str, category: str) -> float | None:
        speeds = [
            r.tokens / r.seconds
            for r in records
            if r.method == method and category in (OVERALL, r.category) and r.seconds > 0
        ]
        return sum(speeds) / len(speeds) if speeds else None

    categories = [OVERALL] + _ordered(r.category for r in records)
    return {
        (method, category): _ratio(mean_speed(method, category), mean_speed(reference, category))
        for category in categories
        for method in _ordered(r.method for r in records)
    }


# --------------------------------------------------------------------------- reports
_SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
"""The instruction sets that tell this project's CPUs apart (one model name, "AMD EPYC", covers
AVX2-only and Zen 4 class parts, whose costs differ 2x)."""


def machine_info(device: str) -> dict:
    """The host the numbers were measured on."""
    import transformers

    processor = platform.processor()
    flags: set[str] = set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and not processor:
                processor = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    info = {
        "platform": platform.platform(),
        "processor": processor or platform.machine(),
        "simd": [f for f in _SIMD_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(device: str = "cpu") -> str:
    """`machine_info` in one line for a benchmark's table: processor, instruction sets, CPUs, threads."""
    info = machine_info(device)
    simd = f" ({', '.join(info['simd'])})" if info["simd"] else ""
    return f"{info['processor']}{simd}, {info['cpus_usable']} usable CPUs, {info['threads']} torch thread(s)"


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict], spec_bench: dict[tuple[str, str], float | None] | None = None) -> str:
    """The rows as one markdown table, in row order (overall first)."""
    spec_bench = spec_bench or {}
    head = ["method", "category", "prompts", "tokens", "seconds", "tokens/s",
            "speedup (totals)", "speedup (Spec-Bench mean)", "tau", "identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in rows:
        cells = [
            row["method"], row["category"], str(row["prompts"]), str(row["tokens"]), _fmt(row["seconds"]),
            _fmt(row["tokens_per_s"], 1), _fmt(row["speedup_vs_hf_ar"]),
            _fmt(spec_bench.get((row["method"], row["category"]))), _fmt(row["tau"]),
            _fmt(row["identical_to_ar"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(model: str, machine: dict, settings: dict, table: str) -> str:
    return "\n".join([
        f"# dvi bench speed: {model}",
        "",
        f"Machine: {machine['processor']}, {machine['cpus_usable']} usable CPUs, {machine['threads']} torch threads, "
        f"device {machine['device']}, torch {machine['torch']}, transformers {machine['transformers']}.",
        f"Settings: batch 1, greedy, max_new_tokens {settings['max_new_tokens']}, exit layer {settings['exit_layer']}, "
        f"gamma {settings['gamma']}, {settings['prompts_used']} prompts from {settings['prompts']}, "
        f"{settings['warmup']} warm-up prompts, methods interleaved per prompt in rotating order.",
        "",
        table,
        "",
        "speedup (totals) = (total tokens / total seconds) / hf_ar's, the `speedup_vs_hf_ar` of speed.json;",
        "speedup (Spec-Bench mean) = mean per-prompt tokens/s / hf_ar's, as Spec-Bench reports it;",
        "tau = new tokens per verifier pass; identical = fraction of prompts whose output equals its reference's",
        f"({settings.get('identity_references_text', 'hf_ar')}).",
        "",
    ])


def plot_speedups(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: speedup vs hf_ar (ratio of totals) per category, one bar per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    categories = _ordered(r["category"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    value = {(r["method"], r["category"]): r["speedup_vs_hf_ar"] for r in rows}
    fig = Figure(figsize=(max(6.0, 1.3 * len(categories) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    top = 1.0
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(categories))]
        ys = [value.get((method, c)) or 0.0 for c in categories]  # n/a plots as an empty slot
        top = max([top, *ys])
        ax.bar(xs, ys, width=width, label=method)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylim(0.0, top * 1.3)  # headroom for the legend
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20, ha="right")
    ax.set_ylabel("speedup vs hf_ar (tokens/s ratio)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=min(len(methods), 3))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_reports(
    out_dir: str | Path, model: str, machine: dict, settings: dict, records: list[RunRecord],
    identity: dict[str, str] | None = None,
    skipped: Sequence[SkippedRequest] = (),
) -> tuple[list[dict], str]:
    """Write speed.json, speed.md, speed.png and speed_runs.jsonl (every timed run) under
    out_dir; return (rows, markdown table). `skipped`: prompts that could not be served."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(records, identity=identity)
    table = markdown_table(rows, spec_bench_speedups(records))
    payload = {"model": model, "machine": machine, "settings": settings, **skipped_summary(skipped),
               "runs": with_renamed_fields(rows)}
    (out / "speed.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "speed.md").write_text(markdown_report(model, machine, settings, table))
    with (out / "speed_runs.jsonl").open("w") as fh:
        for r in records:
            row = asdict(r)
            row["tokens"] = r.tokens
            fh.write(json.dumps(row) + "\n")
    plot_speedups(rows, out / "speed.png", f"{model} ({machine['device']})")
    return rows, table


def settings_record(settings: SpeedSettings, prompts_used: int) -> dict:
    """The settings block of speed.json: the flags plus how each method was measured."""
    record = asdict(settings)
    record["variants"] = {name: directory for name, directory in settings.variants}
    record["methods"] = list(settings.all_methods)
    record.update(
        prompts_used=prompts_used,
        batch_size=1,
        temperature=0.0,
        turns="first turn only, through the chat template when the model has one",
        categories="Spec-Bench tasks: the 8 MT-bench categories are multi_turn",
        order="warm-up prompts through every method first (not recorded); then per prompt every "
        "method in turn, the order rotated by one each prompt",
        timing="time.perf_counter around the generate call only; torch.inference_mode; "
        "EOS and max_new_tokens stop every method",
        speedup_vs_hf_ar="ratio of totals: (sum tokens / sum seconds) / hf_ar's on the same prompts",
        tau="sum new tokens / sum verifier passes (HF methods: calls of the last decoder layer); "
        "rows also carry it as mean_accepted, its old name, for one release",
        identical_to_ar="fraction of prompts whose new tokens equal their reference's token for token "
        "(identity_references)",
        hf_prompt_lookup={"prompt_lookup_num_tokens": PROMPT_LOOKUP_NUM_TOKENS, "max_matching_ngram_size": 2},
    )
    if "hf_early_exit" in settings.methods:
        record["hf_early_exit"] = {"assistant_early_exit": settings.exit_layer, **hf_early_exit_settings(settings)}
    return record
