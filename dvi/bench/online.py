"""The online-learning phase of `dvi bench speed --learn`: a fresh drafter serves the training half
of the prompts and learns from its own traffic, then is frozen and timed on the other half.

Each learning request is decoded exactly as the timed dvi methods decode (same DecodeConfig,
trajectories recorded), fed to a `Learner`, and followed by `updates_per_request` optimiser steps
(`learner.local.train_local`: the service's learning loop in one process). The draft vocabulary
is re-picked from the traffic at every published version. Nothing of this phase is timed for the
speed table; its own cost is reported in `LearningSummary`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from common.model.split import SplitModel
from common.decoding.speculative import GenerationResult


@dataclass(frozen=True)
class LearningSummary:
    """What one schedule's learning phase did (speed.json's `learning` block).

    requests / traffic_tokens: training requests served and the tokens they generated;
    steps: optimiser steps; tokens_seen: scored positions the learner received; drafted /
    accepted: exit-head drafts in the learning traffic and how many the verifier kept;
    versions: weight versions published; seconds: wall time of the whole phase.
    """

    schedule: str
    requests: int
    traffic_tokens: int
    steps: int
    tokens_seen: int
    drafted: int
    accepted: int
    versions: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def learn_online(
    split: SplitModel,
    schedule: str,
    prompts: Sequence[Sequence[int]],
    settings,
    *,
    seed: int = 0,
    on_request: Callable[[GenerationResult], None] | None = None,
) -> LearningSummary:
    """Train `split`'s exit head in place on one pass over `prompts` (token-id lists) with the
    `schedule` (kl-only, kl-rl, rl-only); `settings` is the run's SpeedSettings."""
    from learner.config import LearnerConfig, ScheduleConfig
    from learner.learner import Learner
    from learner.local import LocalLoopConfig, train_local

    config = LearnerConfig(
        schedule=ScheduleConfig(kind=schedule),
        head_lr=settings.learn_lr or LearnerConfig.head_lr,
        lora_lr=settings.learn_lr or LearnerConfig.lora_lr,
        fine_tune_lr=settings.learn_lr or LearnerConfig.fine_tune_lr,  # --learn-lr: every tensor, from any start
        batch_tokens=settings.learn_batch_tokens,
        replay_capacity_tokens=max(LearnerConfig.replay_capacity_tokens, settings.learn_batch_tokens),
        staleness_policy="importance",  # in-process, versions move every few steps: keep the whole FIFO
        seed=seed,
    )
    torch.manual_seed(seed)
    learner = Learner(split, config, learner_id=f"bench-{schedule}")
    loop = LocalLoopConfig(
        steps=2**62, updates_per_request=settings.learn_updates_per_request,
        publish_every=settings.learn_publish_every, eval_every=None, decode=settings.decode_config(),
        seed=seed, max_requests=len(prompts),
    )
    traffic = {"requests": 0, "tokens": 0, "drafted": 0, "accepted": 0}

    def seen(result: GenerationResult) -> None:
        traffic["requests"] += 1
        traffic["tokens"] += len(result.token_ids)
        traffic["drafted"] += result.drafted
        traffic["accepted"] += result.accepted
        if on_request is not None:
            on_request(result)

    started = time.perf_counter()
    train_local(learner, prompts, prompts[:1], loop, on_request=seen)
    learner.publish_version()  # the frozen drafter carries a vocabulary picked from all the traffic
    return LearningSummary(
        schedule=schedule, requests=traffic["requests"], traffic_tokens=traffic["tokens"], steps=learner.step,
        tokens_seen=learner.counters()["tokens_seen"], drafted=traffic["drafted"], accepted=traffic["accepted"],
        versions=learner.version, seconds=time.perf_counter() - started,
    )
