"""`dvi train-local`: the service's learning loop in one process, with held-out evaluation.

Each training request is decoded with the live drafter (recording its trajectory) and published
to an in-memory stream; `learner.loop.LearnerLoop`, the very loop the learner service runs over
Redis, ingests it, trains on the step credit it earns and publishes weight versions to an
in-memory store (`common.transport.memory`). `LocalLoopConfig.loop_config` maps train-local's
knobs onto that loop: K steps per request (`steps_per_request`, at most K per request),
no time-based publish or checkpoint, and a stop at `steps`. In-process the decoder already drafts
with the live weights, so publishing only advances the version that tags the next trajectories
(and ages the replay). Every `eval_every` steps, and at step 0 with the untrained drafter, tau
and acceptance are measured on a fixed held-out prompt set by greedy decoding without recording.

Metrics of an evaluation (pooled over its prompts, as `dvi bench speed` pools them):
  tau         new tokens / verifier passes (mean accepted length + 1 bonus per pass; 1.0 for AR)
  acceptance  accepted drafted tokens / drafted tokens
  agreement   top-1 agreement of the exit head with the verifier at every position of the held-out
              prompts followed by the model's greedy continuations, ungated (common/decoding/agreement.py)
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

from common.core.config import DecodeConfig
from common.core.errors import DVIError
from common.transport.memory import MemoryTrajectoryStream, MemoryWeightStore
from common.decoding.speculative import GenerationResult, SpeculativeDecoder
from learner.learner import Learner
from learner.loop import LearnerLoop, LearnerLoopConfig

POINT_FIELDS = (
    "step", "tokens_seen", "traffic_tokens", "requests", "version", "tau", "acceptance", "agreement",
    "kl", "ce", "pg", "phase", "lambda_pg", "seconds",
)


@dataclass(frozen=True)
class LocalLoopConfig:
    """Knobs of `train_local`; the learner's own knobs live in its LearnerConfig."""

    steps: int
    """Stop once the learner has taken this many optimiser steps (counted from step 0, so a resumed learner continues)."""
    updates_per_request: int = 1
    """K: optimiser steps attempted after each training request (fewer while the replay is not ready)."""
    publish_every: int = 8
    """N: publish a new weight version every N optimiser steps (in one process a version costs a
    copy of the adapter; `dvi train-local` and `dvi bench` take this default)."""
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

    def loop_config(self, learner_id: str) -> LearnerLoopConfig:
        """The service loop's settings that make it train-local: one request per poll earns K
        steps (taken at once, fewer while the replay is not ready), a version every N steps,
        nothing time-based (reproducible), no step past `steps`."""
        return LearnerLoopConfig(
            learner_id=learner_id, checkpoint_dir=None, publish_every_steps=self.publish_every,
            publish_every_s=math.inf, checkpoint_every_s=math.inf, claim_every_s=math.inf,
            replay_ratio=0.0, steps_per_request=float(self.updates_per_request),
            max_steps_per_poll=self.updates_per_request, stop_at_step=self.steps, read_count=1, block_ms=0,
        )

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


class HeldOutAgreement:
    """`agreement` of a point: the exit head's top-1 agreement with the verifier at every position
    (start 0) of the held-out prompts followed by the model's greedy continuations. The verifier's
    side is computed on the first call and kept (the verifier never changes)."""

    def __init__(self, split, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        self.split, self.prompts, self.max_new_tokens = split, prompts, max_new_tokens
        self._targets = None

    def __call__(self) -> float:
        from common.decoding.agreement import agreement, greedy_continuations, verifier_targets

        if self._targets is None:
            sequences, _ = greedy_continuations(self.split, self.prompts, self.max_new_tokens)
            self._targets = verifier_targets(self.split, sequences, 0)
        return agreement(self.split, self._targets).rate


class _Points:
    """Evaluation points of one `train_local` run (see the module docstring for their fields)."""

    def __init__(self, learner: Learner, evaluate_now: Callable[[], dict[str, float]],
                 agreement_now: Callable[[], float], traffic_tokens: int, on_point: Callable[[dict], None] | None) -> None:
        self.learner, self.evaluate_now, self.agreement_now, self.on_point = learner, evaluate_now, agreement_now, on_point
        self.traffic = int(traffic_tokens)
        self.points: list[dict] = []
        self.window: list[dict] = []  # update stats since the last point
        self.last_phase: str | None = None
        self.started = time.perf_counter()

    def add(self, measured: dict[str, float] | None = None) -> None:
        measured = measured if measured is not None else self.evaluate_now()
        counters, window = self.learner.counters(), self.window

        def mean(key: str) -> float | None:
            values = [s[key] for s in window if math.isfinite(s[key])]
            return sum(values) / len(values) if values else None

        p = {
            "step": self.learner.step,
            "tokens_seen": counters["tokens_seen"],
            "traffic_tokens": self.traffic,
            "requests": counters["added"] + counters["stale_dropped"],
            "version": self.learner.version,
            "tau": measured["tau"],
            "acceptance": measured["acceptance"],
            "agreement": self.agreement_now(),
            "kl": mean("kl"),
            "ce": mean("ce"),
            "pg": mean("pg"),
            "phase": self.last_phase,
            "lambda_pg": window[-1]["lambda_pg"] if window else None,
            "seconds": time.perf_counter() - self.started,
        }
        self.points.append(p)
        window.clear()
        if self.on_point is not None:
            self.on_point(p)


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
    each evaluation, on_request(result) after each training request is decoded.
    """
    if not train_prompts:
        raise ValueError("train_local needs at least one training prompt")
    if not eval_prompts:
        raise ValueError("train_local needs at least one evaluation prompt")
    decoder = SpeculativeDecoder(learner.split)
    evaluating = config.eval_every is not None
    points = _Points(learner, lambda: evaluate(decoder, eval_prompts, config.held_out_decode),
                     HeldOutAgreement(learner.split, eval_prompts, config.held_out_decode.max_new_tokens),
                     traffic_tokens, on_point)
    if evaluate_at_start and evaluating:
        points.add(initial_eval)
    stream = MemoryTrajectoryStream()
    loop = LearnerLoop(learner, stream, MemoryWeightStore(), config.loop_config(learner.learner_id),
                       on_step=_step_hook(learner, config, points, on_step))
    loop.start()
    while learner.step < config.steps:
        counters = learner.counters()
        index = counters["added"] + counters["stale_dropped"]
        if config.max_requests is not None and index >= config.max_requests:
            break
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        result = decoder.generate(
            list(train_prompts[index % len(train_prompts)]), config.train_decode,
            generator=generator, request_id=f"{learner.learner_id}-req-{index}",
        )
        points.traffic += len(result.token_ids)
        if on_request is not None:
            on_request(result)
        stream.publish(result.trajectory)
        loop.poll(block_ms=0)
    if evaluating and (not points.points or points.points[-1]["step"] != learner.step):
        points.add()  # the loop stopped between points (or had nothing to do): still report where it stands
    return points.points


def _step_hook(learner: Learner, config: LocalLoopConfig, points: _Points,
               on_step: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """The loop's per-step callback: the caller's `on_step`, the divergence guard, evaluation points."""
    skips = 0

    def hook(stats: dict) -> None:
        nonlocal skips
        if on_step is not None:
            on_step(stats)
        if stats["skipped"]:
            skips += 1
            if skips >= config.max_consecutive_skips:
                raise DVIError(f"training diverged: {skips} non-finite updates in a row at step {learner.step}")
            return
        skips = 0
        points.window.append(stats)
        points.last_phase = stats["phase"]
        every = config.eval_every
        if every is not None and (learner.step % every == 0 or learner.step >= config.steps):
            points.add()

    return hook
