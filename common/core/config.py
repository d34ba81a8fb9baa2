"""Frozen, validated configuration dataclasses shared by the actors and the learner.

Every field carries one doc line. `__post_init__` raises `ValueError` naming the bad value, so
the CLI can turn a bad flag into a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m-instruct"
WEIGHTS = ("native", "dequantized")
"""The precisions `ModelSpec.weights` (and `--weights`) accept."""


def require(condition: bool, message: str) -> None:
    """The one validation helper of every config: ValueError(`message`) unless `condition`."""
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of the drafter: where the backbone is cut and what the trainable exit head holds."""

    exit_layer: int = 4
    """k: the drafter runs decoder layers [0, k); the verifier's deep pass runs [k, L). Shallow by
    default: on a CPU a drafted token costs its k shallow layers, so a cheap drafter pays at the
    acceptance an online-trained exit head reaches (README, "Exit layer")."""
    exit_init_layer: int | None = None
    """Which of the model's own decoder layers initialises the exit adapter layer (None: k, the
    layer right after the cut, which already reads h_k; the last layer L - 1 reads a far deeper
    state and, untrained, agrees with the verifier 0% of the time on SmolLM2-135M)."""
    full_rank_exit_layer: bool = True
    """Train every weight of the exit layer (its private copy: the verifier never runs it, so
    decoding stays lossless; peft's modules_to_save); False: a LoRA of `lora_rank` on its projections."""
    lora_rank: int = 16
    """LoRA rank of every LoRA-adapted projection of the exit head (the LM head as the drafter sees
    it, and the exit layer's projections unless it trains at full rank)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch while training."""
    adapt_lm_head: bool = True
    """Put a LoRA on the (frozen, shared) LM head as seen by the drafter."""
    draft_vocab_size: int = 8192
    """Draft from this many token ids only (0 = the full vocabulary; a size >= the model's is the
    full one): the drafter's LM head shrinks to those rows, the verifier keeps every token, so
    decoding stays lossless. The learner picks the ids as the most frequent tokens of the traffic
    it trains on."""

    def __post_init__(self) -> None:
        require(self.exit_layer >= 1, f"exit_layer must be >= 1, got {self.exit_layer}")
        require(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha >= 1, f"lora_alpha must be >= 1, got {self.lora_alpha}")
        require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        require(self.draft_vocab_size >= 0, f"draft_vocab_size must be >= 0, got {self.draft_vocab_size}")
        require(
            self.adapt_lm_head or not self.full_rank_exit_layer,
            "a full-rank exit layer needs adapt_lm_head (peft needs at least one LoRA target)",
        )

    def validate_for(self, num_layers: int) -> None:
        """Raise ValueError unless this drafter fits a model with `num_layers` decoder layers."""
        require(
            1 <= self.exit_layer < num_layers,
            f"exit layer {self.exit_layer} is out of range: this model has {num_layers} layers, "
            f"so the exit layer must be in [1, {num_layers - 1}]",
        )
        if self.exit_init_layer is not None:
            require(
                0 <= self.exit_init_layer < num_layers,
                f"exit_init_layer {self.exit_init_layer} is out of range [0, {num_layers - 1}]",
            )

    def init_layer_for(self, num_layers: int) -> int:
        """The decoder layer the exit adapter is copied from (see `exit_init_layer`)."""
        return self.exit_layer if self.exit_init_layer is None else self.exit_init_layer


@dataclass(frozen=True)
class TrafficConfig:
    """The n-gram index a decoder learns from the requests it serves (common/core/traffic_draft.py)."""

    max_ngram: int = 4
    """Longest suffix n-gram the index matches (shorter ones are tried down to min_ngram)."""
    min_ngram: int = 2
    """Shortest: one token alone says too little about what follows across requests."""
    share: float = 0.5
    """A continuation is drafted only while it holds at least this share of its n-gram's count."""
    min_count: int = 2
    """... and was seen at least this many times."""
    capacity: int = 262144
    """Most n-grams held (about 50 MB): beyond it every count is halved and zeros dropped. The
    training half of the Spec-Bench dev prompts (124 requests, 128 new tokens) makes 95,742."""

    def __post_init__(self) -> None:
        require(1 <= self.min_ngram <= self.max_ngram, f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram} and {self.max_ngram}")
        require(0.0 < self.share <= 1.0, f"share must be in (0, 1], got {self.share}")
        require(self.min_count >= 1, f"min_count must be >= 1, got {self.min_count}")
        require(self.capacity >= 1, f"capacity must be >= 1, got {self.capacity}")


@dataclass(frozen=True)
class DecodeConfig:
    """How one request is decoded."""

    gamma: int = 5
    """Most tokens the exit head drafts per block; 0 (with context_tokens 0) is plain autoregressive
    decoding through the same loop. 5 keeps a block at <= 6 rows, which a CPU verifies for about
    the price of one (benchmarks/cost_breakdown.py)."""
    temperature: float = 0.0
    """0 is greedy; > 0 samples and the output follows the model's own sampling distribution."""
    top_k: int = 0
    """Keep only the k most likely tokens before sampling (0 = off). Applies to the verifier's target."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off). Applies to the verifier's target."""
    confidence_threshold: float = 0.5
    """Stop drafting a block once the drafter's top-1 probability falls below this (Kangaroo's eta)."""
    adaptive_gamma: bool = True
    """Draft at most `gamma` tokens, as many as pay off: the count with the most expected tokens per
    unit of cost, from the exit head's running acceptance and the cost of a draft step and of a
    verify row relative to a verifier pass (common/core/adaptive_gamma.py); a context draft is cut
    the same way, from the running acceptance of its match length (common/core/arbitration.py)."""
    context_tokens: int = 5
    """Most tokens drafted from the context per block (prompt lookup, common/core/context_draft.py;
    0 = off). A block whose suffix occurred before drafts its continuation instead of asking the
    exit head."""
    arbitrate: bool = True
    """When the context has a match, choose between its draft and the exit head's by expected
    tokens per unit of cost (common/core/arbitration.py); False: any context match wins the block."""
    shared_shallow_pass: bool = True
    """With a context match, run the block's input token and the context's draft through the
    shallow layers in one pass (one read of their weights), the exit head's probe reading the
    input's state from it: a context draft costs its verify rows alone and a probe the exit head
    alone (`SplitModel.probe_cost`). False: each in a pass of its own, the context's priced as a
    draft step and so is a probe (the decoder before 2026-12-07; the ablation's `shared_pass`)."""
    traffic_drafting: bool = True
    """Where the request's own context matches its last token at most, draft what followed the
    suffix in the requests the decoder served before (common/core/traffic_draft.py), priced and
    arbitrated as a context draft. Greedy requests only: at temperature > 0 a draft changes which
    random numbers a seeded request draws, and a seeded request decodes the same whatever was
    served before it. Needs context_tokens > 0; every such request feeds the index, greedy or not."""
    context_ngram: int = 3
    """Longest suffix n-gram context drafting matches (shorter ones are tried down to context_min_ngram)."""
    context_min_ngram: int = 1
    """Shortest suffix n-gram context drafting accepts as a match."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens (EOS stops earlier)."""
    record_topk: int = 32
    """Verifier log-probs kept per drafted token in trajectory records (0 = the full vocabulary)."""
    record_trajectories: bool = False
    """Collect a Trajectory for the learner while decoding."""
    record_prompt_positions: int = 64
    """When recording: the verifier's top-K at up to this many prompt positions too (spread evenly,
    the last ones included; 0 = none), computed in the prefill pass (the LM head on those rows
    only): distillation targets the exit head is never asked about while drafting."""

    def __post_init__(self) -> None:
        require(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}")
        require(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(
            0.0 <= self.confidence_threshold <= 1.0,
            f"confidence_threshold must be in [0, 1], got {self.confidence_threshold}",
        )
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(self.context_tokens >= 0, f"context_tokens must be >= 0, got {self.context_tokens}")
        require(
            1 <= self.context_min_ngram <= self.context_ngram,
            f"need 1 <= context_min_ngram <= context_ngram, got {self.context_min_ngram} and {self.context_ngram}",
        )
        require(self.record_topk >= 0, f"record_topk must be >= 0, got {self.record_topk}")
        require(self.record_prompt_positions >= 0, f"record_prompt_positions must be >= 0, got {self.record_prompt_positions}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def autoregressive(cls, max_new_tokens: int = 128, **kwargs) -> "DecodeConfig":
        """Plain autoregressive decoding through the same loop: no draft of any kind."""
        return cls(gamma=0, context_tokens=0, max_new_tokens=max_new_tokens, **kwargs)


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to load and how."""

    model: str = DEFAULT_MODEL
    """An alias (smollm2-135m-instruct), a local HF directory, or a hub id."""
    dtype: str = "float32"
    """Torch dtype of the frozen base weights: float32, float16 or bfloat16."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda:0."""
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    """The drafter's shape."""
    warm_start: bool = True
    """Start the drafter from the warm start made for this model and exit layer (`dvi warmstart`;
    common/model/warm_start.py: the user's cache, then the one shipped for the default model) when one
    fits; otherwise, or when False, the exit head starts untrained. An adapter loaded afterwards
    (`--adapter`) replaces it."""
    engine: str = "fast"
    """Inference forward: "fast" (common/model/engine/fast_decoder.py: packed weights, static KV cache; used
    when the model supports it and reproduces the HF forward) or "hf" (the HF decoder layers)."""
    weights: str = "native"
    """Precision of the inference weights of a model shipped quantised (a GGUF alias): "native"
    runs its Q4_1/Q8_0 matrices at that precision in the fast engine (fp32 CPU only; the exit
    head, norms and embedding stay floating point), "dequantized" runs them dequantised to
    `dtype`. A model loaded from safetensors has no native form: both mean its `dtype` weights."""

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "model must be a non-empty id or path")
        require(
            self.dtype in ("float32", "float16", "bfloat16"),
            f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}",
        )
        require(self.engine in ("fast", "hf"), f"engine must be fast or hf, got {self.engine!r}")
        require(self.weights in WEIGHTS, f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
