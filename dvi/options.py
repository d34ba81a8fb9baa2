"""Command-line options that several `dvi` commands share, declared once (flag, type and help).

Use as a parameter annotation with the default beside it, e.g.
`gamma: options.Gamma = DecodeConfig.gamma`; the defaults stay those of the config dataclasses.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Iterator, Optional

import typer

Model = Annotated[str, typer.Option("--model", help="Alias, local HF directory, or hub id.")]
Weights = Annotated[str, typer.Option(
    "--weights", help="A GGUF model's weights in the fast engine: native (its own Q4_1/Q8_0 blocks) or dequantized (fp32).")]
ExitLayer = Annotated[int, typer.Option("--exit-layer", help="k: the drafter runs decoder layers [0, k).")]
DraftVocabSize = Annotated[int, typer.Option(
    "--draft-vocab-size", help="Tokens the drafter proposes from (0 = the full vocabulary); learned from traffic.")]
Gamma = Annotated[int, typer.Option("--gamma", help="Most tokens the exit head drafts per block.")]
ConfidenceThreshold = Annotated[float, typer.Option(
    "--confidence-threshold", help="Stop drafting below this drafter top-1 probability (0 = off).")]
ContextTokens = Annotated[int, typer.Option(
    "--context-tokens", "--lookup-tokens", help="Most tokens a block drafts from the context (prompt lookup; 0 = off).")]
ContextMinNgram = Annotated[int, typer.Option("--context-min-ngram", "--lookup-min-ngram", help="Shortest suffix n-gram a context draft matches.")]
TrafficDrafting = Annotated[bool, typer.Option(
    "--traffic-drafting/--no-traffic-drafting",
    help="Where a request's own context matches one token at most, draft what followed its suffix in the requests served "
         "before (greedy requests; each actor learns its own bounded index).")]
AdaptiveGamma = Annotated[bool, typer.Option(
    "--adaptive-gamma/--fixed-gamma", help="Draft as many exit-head tokens as pay off (<= gamma), or always gamma.")]
TruncatePrompts = Annotated[bool, typer.Option(
    "--truncate-prompts/--skip-long-prompts",
    help="A prompt too long for the context with max-new-tokens: keep its last tokens (default: skip it, with a warning).")]
PublishEvery = Annotated[int, typer.Option("--publish-every", help="Learner optimiser steps per weight version.")]
PublishEverySeconds = Annotated[float, typer.Option(
    "--publish-every-s", help="Also publish after this many seconds with at least one step.")]
ReplayRatio = Annotated[float, typer.Option("--replay-ratio", help="Learner steps per batch of newly added drafted tokens.")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="Torch CPU threads for the run (default: torch's own).")]


def config_fields(config_class, given: dict) -> dict:
    """The entries of `given` (a command's `locals()`) that name a field of the dataclass
    `config_class`: what a command passes on to its settings, the rest taking their defaults."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in given.items() if k in names}


def check_threads(threads: int | None) -> None:
    """ValueError unless --threads is unset or >= 1 (call it before slow work)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch on `threads` CPU threads (None: as it is), then put back the
    previous count, so in-process callers (tests) get theirs back."""
    check_threads(threads)
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
