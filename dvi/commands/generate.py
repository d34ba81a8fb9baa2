"""`dvi generate`: decode one prompt with the DVI drafter/verifier, streaming text to stdout."""

from __future__ import annotations

import sys

import torch
import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig, ModelSpec
from dvi import options
from dvi.app import app


def load_split(model: str, exit_layer: int, adapter: str | None, dtype: str = "float32", device: str = "cpu",
               weights: str = ModelSpec.weights):
    """Build the SplitModel for CLI commands (validated configs, optional adapter)."""
    from common.model.split import SplitModel

    spec = ModelSpec(model=model, dtype=dtype, device=device, drafter=DrafterConfig(exit_layer=exit_layer), weights=weights)
    split = SplitModel.load(spec)
    if adapter:
        split.load_adapter(adapter)
    return split


class TextStreamer:
    """Prints decoded text as tokens are committed, re-decoding the tail so multi-token characters render."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for the next tokens
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", help="The user message (the chat template is applied when the model has one)."),
    model: options.Model = DEFAULT_MODEL,
    weights: options.Weights = ModelSpec.weights,
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: options.Gamma = DecodeConfig.gamma,
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples losslessly."),
    max_new_tokens: int = typer.Option(DecodeConfig.max_new_tokens, "--max-new-tokens"),
    context_tokens: options.ContextTokens = DecodeConfig.context_tokens,
    confidence_threshold: options.ConfidenceThreshold = DecodeConfig.confidence_threshold,
    adaptive_gamma: options.AdaptiveGamma = DecodeConfig.adaptive_gamma,
    adapter: str = typer.Option(None, "--adapter", help="A trained drafter adapter directory."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling generator."),
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print tau and acceptance to stderr at the end."),
) -> None:
    """Generate a reply to PROMPT, streaming text; the output is exactly the model's own decoding."""
    from common.core.prompts import encode_prompt
    from common.decoding.speculative import SpeculativeDecoder

    if not prompt.strip():
        raise ValueError("prompt is empty")
    config = DecodeConfig(gamma=gamma, temperature=temperature, max_new_tokens=max_new_tokens, context_tokens=context_tokens,
                          confidence_threshold=confidence_threshold, adaptive_gamma=adaptive_gamma)
    split = load_split(model, exit_layer, adapter, weights=weights)
    ids = encode_prompt(split.tokenizer, prompt)
    generator = torch.Generator().manual_seed(seed)
    result = SpeculativeDecoder(split).generate(ids, config, generator=generator, on_tokens=TextStreamer(split.tokenizer))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        print(
            f"[{len(result.token_ids)} tokens in {result.seconds:.2f}s, "
            f"{len(result.token_ids) / max(result.seconds, 1e-9):.1f} tok/s, tau {result.tau:.2f}, "
            f"exit-head acceptance {result.acceptance_rate:.2f} ({result.drafted} drafted), "
            f"context drafts {result.context_accepted}/{result.context_drafted} accepted, weight version {result.weight_version}]",
            file=sys.stderr,
        )
