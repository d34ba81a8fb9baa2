"""The single-process DVI training loop: decode with the live drafter, learn from it, measure it.

One loop iteration serves one training request with the current drafter (recording its
trajectory), feeds it to the `Learner`, and takes up to K optimiser steps from the replay. Every
`publish_every` steps a new weight version is published; in-process the decoder already drafts
with the live weights, so publishing only advances the version that tags the next trajectories
(and ages the replay). Every `eval_every` steps, and at step 0 with the untrained drafter, tau
and acceptance are measured on a fixed held-out prompt set by greedy decoding without recording.

Metrics of an evaluation (pooled over its prompts, as `dvi bench speed` pools them):
  tau         new tokens / verifier passes (mean accepted length + 1 bonus per pass; 1.0 for AR)
  acceptance  accepted drafted tokens / drafted tokens
A point also carries the learner's mean kl / ce / pg since the previous point, the phase of the
last step, `tokens_seen` (drafted tokens fed to the learner) and `traffic_tokens` (new tokens
the training requests generated).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from common.config import DecodeConfig
from common.errors import DVIError
from common.speculative import GenerationResult, SpeculativeDecoder
from learner.learner import Learner

POINT_FIELDS = (
    "step", "tokens_seen", "traffic_tokens", "requests", "version", "tau", "acceptance",
    "kl", "ce", "pg", "phase", "lambda_pg", "seconds",
)


@dataclass(frozen=True)
class LocalLoopConfig:
    """Knobs of `train_local`; the learner's own knobs live in its LearnerConfig."""

    steps: int
    """Stop once the learner has taken this many optimiser steps (counted from step 0, so a resumed learner continues)."""
    updates_per_request: int = 1
    """K: optimiser steps attempted after each training request (fewer while the replay is not ready)."""
    publish_every: int = 1
    """N: publish a new weight version every N optimiser steps."""
    eval_every: int | None = 50
    """E: evaluate tau and acceptance every E optimiser steps (and at the start and the last step);
    None = never (the loop only trains, and returns no points)."""
    max_requests: int | None = None
    """Stop after serving this many training requests in all (None = only `steps` stops the loop)."""
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(gamma=4, max_new_tokens=64))
    """How training requests are decoded (recording is switched on by the loop)."""
    eval_decode: DecodeConfig | None = None
    """How held-out prompts are decoded; None = `decode` made greedy, without recording."""
    seed: int = 0
    """Seeds the sampling generator of training request i as (seed, i) (only used at temperature > 0)."""
    max_consecutive_skips: int = 50
    """Give up (DVIError) after this many NaN/inf-skipped updates in a row."""

    def __post_init__(self) -> None:
        for name in ("steps", "updates_per_request", "publish_every", "eval_every", "max_consecutive_skips", "max_requests"):
            value = getattr(self, name)
            if value is None and name in ("eval_every", "max_requests"):
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def train_decode(self) -> DecodeConfig:
        return replace(self.decode, record_trajectories=True)

    @property
    def held_out_decode(self) -> DecodeConfig:
        base = self.eval_decode if self.eval_decode is not None else self.decode
        return replace(base, temperature=0.0, record_trajectories=False)


def evaluate(decoder: SpeculativeDecoder, prompts: Sequence[Sequence[int]], decode: DecodeConfig) -> dict[str, float]:
    """Greedy decoding of every prompt with the live drafter: pooled tau and acceptance (see module doc)."""
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    tokens = passes = drafted = accepted = 0
    started = time.perf_counter()
    for ids in prompts:
        result = decoder.generate(list(ids), decode)
        tokens += len(result.token_ids)
        passes += result.verifier_passes
        drafted += result.drafted
        accepted += result.accepted
    return {
        "tau": tokens / passes if passes else 0.0,
        "acceptance": accepted / drafted if drafted else 0.0,
        "eval_tokens": float(tokens),
        "eval_seconds": time.perf_counter() - started,
    }


def train_local(
    learner: Learner,
    train_prompts: Sequence[Sequence[int]],
    eval_prompts: Sequence[Sequence[int]],
    config: LocalLoopConfig,
    *,
    initial_eval: dict[str, float] | None = None,
    evaluate_at_start: bool = True,
    traffic_tokens: int = 0,
    on_step: Callable[[dict], None] | None = None,
    on_point: Callable[[dict], None] | None = None,
    on_request: Callable[[GenerationResult], None] | None = None,
) -> list[dict]:
    """Run the loop until `learner.step == config.steps`; returns the evaluation points, in order.

    train_prompts / eval_prompts: token-id lists. Training request i (i = distinct requests the
    learner has seen, so a resumed learner continues the stream) uses train_prompts[i % len].
    initial_eval: a precomputed `evaluate` of the current drafter to use as the start point
    (the benchmark shares one untrained evaluation between schedules); evaluate_at_start=False
    skips the start point (a resumed run that already has it). traffic_tokens: starting value
    of the traffic counter (resume). on_step(stats) after each update, on_point(point) after
    each evaluation.
    """
    if not train_prompts:
        raise ValueError("train_local needs at least one training prompt")
    if not eval_prompts:
        raise ValueError("train_local needs at least one evaluation prompt")
    decoder = SpeculativeDecoder(learner.split)
    train_decode, eval_decode = config.train_decode, config.held_out_decode
    points: list[dict] = []
    window: list[dict] = []  # update stats since the last point
    last_phase = None
    started = time.perf_counter()

    def point(measured: dict[str, float] | None = None) -> None:
        measured = measured if measured is not None else evaluate(decoder, eval_prompts, eval_decode)
        counters = learner.counters()

        def mean(key: str) -> float | None:
            values = [s[key] for s in window if math.isfinite(s[key])]
            return sum(values) / len(values) if values else None

        p = {
            "step": learner.step,
            "tokens_seen": counters["tokens_seen"],
            "traffic_tokens": traffic,
            "requests": counters["added"] + counters["stale_dropped"],
            "version": learner.version,
            "tau": measured["tau"],
            "acceptance": measured["acceptance"],
            "kl": mean("kl"),
            "ce": mean("ce"),
            "pg": mean("pg"),
            "phase": last_phase,
            "lambda_pg": window[-1]["lambda_pg"] if window else None,
            "seconds": time.perf_counter() - started,
        }
        points.append(p)
        window.clear()
        if on_point is not None:
            on_point(p)

    traffic = int(traffic_tokens)
    evaluating = config.eval_every is not None
    if evaluate_at_start and evaluating:
        point(initial_eval)
    skips = 0
    while learner.step < config.steps:
        counters = learner.counters()
        index = counters["added"] + counters["stale_dropped"]
        if config.max_requests is not None and index >= config.max_requests:
            break
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        result = decoder.generate(
            list(train_prompts[index % len(train_prompts)]), train_decode,
            generator=generator, request_id=f"{learner.learner_id}-req-{index}",
        )
        traffic += len(result.token_ids)
        if on_request is not None:
            on_request(result)
        learner.add([result.trajectory])
        for _ in range(config.updates_per_request):
            stats = learner.train_step()
            if stats is None:
                break
            if on_step is not None:
                on_step(stats)
            if stats["skipped"]:
                skips += 1
                if skips >= config.max_consecutive_skips:
                    raise DVIError(f"training diverged: {skips} non-finite updates in a row at step {learner.step}")
                continue
            skips = 0
            window.append(stats)
            last_phase = stats["phase"]
            if learner.step % config.publish_every == 0:
                learner.publish_version()
            if evaluating and (learner.step % config.eval_every == 0 or learner.step >= config.steps):
                point()
            if learner.step >= config.steps:
                break
    if evaluating and (not points or points[-1]["step"] != learner.step):
        point()  # the loop stopped between points (or had nothing to do): still report where it stands
    return points
