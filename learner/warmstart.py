"""Warm start by self-distillation: train the drafter on the model's own generations before any traffic.

The exit head starts as a copy of one decoder layer; untrained, it agrees with the verifier on
few positions, and online learning spends its first requests undoing that. A warm start instead
distils the verifier into the drafter on text the model writes itself, from seed instructions the
project ships (`dvi/data/warmstart_seeds.jsonl`: writing, coding, math, QA, translation,
summarisation, conversation; never the Spec-Bench evaluation prompts) and, with `self_seeds`, from
requests the model writes itself (learner/self_seeds.py, added by `dvi warmstart`):

  1. corpus   each seed prompt is decoded by the verifier (lossless: the model's own greedy output
              at temperature 0, or its sampling distribution above it) with context drafting only,
              recording a Trajectory: layer-k states of every position and the verifier's top-K at
              every position, prompt positions included (DecodeConfig.record_prompt_positions), all
              computed in the passes decoding runs anyway (no separate teacher forward);
  2. train    the project's own `Learner` with the kl-only schedule over the whole corpus (replay
              large enough to hold all of it), in `chunks` stages: after stage i the drafter has
              seen the first i/chunks of the corpus, and its held-out agreement
              (common/decoding/agreement.py) is measured: the agreement curve against warm-start tokens.
The draft vocabulary is picked from the corpus's token counts, so the warm start also replaces
the "lowest ids" vocabulary an untrained reduced drafter starts with.

The corpus only depends on the frozen model (never on the drafter), so it is cached on disk as
msgpack trajectories (common/core/codec.py), one file per generation keyed by a hash of its settings,
prompt and sample index (`corpus_key`): a seed file that grows regenerates only its new prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from common.decoding.agreement import AgreementTargets, agreement
from common.core.codec import decode_trajectory, encode_trajectory
from common.core.config import DecodeConfig, ModelSpec
from common.model.split import SplitModel
from common.decoding.batched_sampling import sample_continuations
from common.decoding.speculative import BATCH_ROWS, SpeculativeDecoder
from common.decoding.teacher import scored_trajectory
from common.core.types import Trajectory
from learner.config import LearnerConfig, ScheduleConfig
from learner.learner import Learner
from learner.workers import model_pool, worker_split

log = logging.getLogger(__name__)

CORPUS_SETTINGS = "corpus.json"
_MAX_RECORD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class WarmStartConfig:
    """How the warm-start corpus is generated and the drafter trained on it."""

    max_new_tokens: int = 128
    """New tokens generated per seed prompt (EOS stops earlier)."""
    temperature: float = 0.7
    """Decoding temperature of the corpus (0: the model's greedy output). Sampled continuations
    give more distinct text per seed prompt: at 0.7 with 3 samples of 128 tokens, 29.3% held-out
    agreement against 23.9% for one greedy continuation of 80 tokens (SmolLM2-135M, k = 4, 421
    seed prompts; README, "Improve" and its history)."""
    samples_per_prompt: int = 2
    """Generations per seed prompt (more than 1 only makes sense at temperature > 0). On the 421
    shipped seeds each doubling added 3-4 points of held-out agreement up to 6 samples (33.4%) and
    12 only 0.9 more: samples of one seed are close text, which the head memorises (59% agreement
    on its trained-on seeds against 34% held out, benchmarks/agreement_gap.py). So the corpus
    spends its generations on more seeds (`self_seeds`) at 2 samples each (SmolLM2-135M, k = 4;
    README, "Improve"). `dvi warmstart --workers` generates them on every core."""
    record_topk: int = 32
    """Verifier log-probs kept per position (the KL's targets)."""
    self_seeds: int = 4800
    """Seed instructions the model writes itself (learner/self_seeds.py), added after the shipped
    ones and sampled `samples_per_prompt` times each like them. Wider text pays more than more
    samples of the same seeds: at equal corpus (5,052 generations), 421 shipped + 421 self-written
    seeds x 6 samples gave 34.2% held-out agreement against 32.5% for 421 seeds x 12; 421 + 2,400
    seeds x 2 (5,642 generations, 638k tokens) gave 35.5% (Zen 4 class AMD EPYC); 421 + 4,800 x 2
    (10,442 generations, 1,185k tokens) at half the epochs, about the same training steps, 36.3%
    (36.2% in bf16 against 35.8% for the 2,400-seed one scored on the same Intel Xeon; SmolLM2-135M,
    k = 4; README, "Improve"). Past that, more of this text no longer pays: 534 further seeds x 2
    fine-tuned on moved held-out agreement by -0.5 points, while the head agrees 57% on such text
    unseen (benchmarks/plateau_probe.py)."""
    batch_size: int = BATCH_ROWS
    """Generations made together, the self-written seed instructions' too. 1: each is decoded
    alone by the speculative decoder with context drafting (the model's exact sampling, seeded by
    its cache key). Above 1, on a CPU (`batches_on_decoder`): that many per
    verifier pass, drafting off (`SpeculativeDecoder.generate_batch`): each generation still the
    model's exact sampling seeded by its key, and the same text whatever the batch size. On one
    core of an Intel Xeon (Sapphire Rapids class) 8 per pass made corpus text 2.41x as fast as
    one at a time (214 against 89 tokens/s; 16: 2.54x; `benchmarks/corpus_throughput.py`).
    Elsewhere (an accelerator): that many sampled in one batch from the model's HF forward
    (common/decoding/batched_sampling.py), each then scored by one teacher-forced verifier pass
    (common/decoding/teacher.py), seeded by the batch's keys."""
    epochs: float = 1.5
    """Passes over the corpus, in scored positions: steps = epochs * corpus positions / batch_tokens.
    With twice the seeds, 1.5 passes take about the steps 3 took before (20,857 against 22,400) and
    scored higher at every stage of the curve, ending 0.4 points above (above; README, "Improve")."""
    lr_schedule: str = "cosine"
    """The learning rate over the run: "constant" (the learner's rates) or "cosine" (decayed from
    them to 0 at the last step). Cosine measured 18.6% held-out agreement against 16.9% for
    constant on SmolLM2 (the first 80 seed generations, 3 epochs; 19.8% at 6 epochs)."""
    chunks: int = 6
    """Stages of the agreement curve: stage i trains on the first i/chunks of the corpus."""
    seed: int = 0
    """Seeds corpus sampling (temperature > 0) and the learner's batch sampling."""
    learner: LearnerConfig = field(
        default_factory=lambda: LearnerConfig(schedule=ScheduleConfig(kind="kl-only"), batch_tokens=128, max_staleness=1_000_000)
    )
    """The learner's rates (LearnerConfig's, the service's) and batch (kl-only; staleness never applies: the
    corpus is not traffic). 128 positions a step: at equal compute, 4x the updates of 512 measured 17% held-out
    agreement against 9.5% on SmolLM2 (80 corpus requests, 2 epochs)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")
        if self.self_seeds < 0:
            raise ValueError(f"self_seeds must be >= 0, got {self.self_seeds}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def decode(self) -> DecodeConfig:
        """Corpus decoding: context drafting only (the drafter's weights cannot change the output),
        every position recorded."""
        return DecodeConfig(
            gamma=0, temperature=self.temperature, max_new_tokens=self.max_new_tokens, record_trajectories=True,
            record_topk=self.record_topk, record_prompt_positions=1_000_000,
        )

    @property
    def batch_decode(self) -> DecodeConfig:
        """Corpus decoding of a batch on the fast engine (`SpeculativeDecoder.generate_batch`): as
        `decode`, with no drafting at all."""
        return replace(self.decode, context_tokens=0)

    def corpus_settings(self, on_cpu: bool = True) -> dict:
        """What one cached generation depends on besides the model, its prompt and its sample index,
        made on a split on the CPU or not (`batches_on_decoder`)."""
        settings = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                    "record_topk": self.record_topk, "seed": self.seed}
        if self.batch_size > 1:  # other text than the decoder's (1 keeps the keys it always had)
            if on_cpu:  # each generation decoded as alone, drafting off: the batch size does not matter
                settings["sampler"] = "batch-rows"
            else:
                settings["batch_size"] = self.batch_size
        return settings


def batches_on_decoder(split: SplitModel) -> bool:
    """True where a batch of corpus generations is made by `SpeculativeDecoder.generate_batch` (a
    split on the CPU: its engine reads the weights once for a batch's rows, and its HF forward is
    slower than the decoder), False where it is sampled by the HF forward and then scored (an
    accelerator, where a batch of rows costs about one)."""
    return torch.device(split.device).type == "cpu"


def corpus_key(settings: dict, prompt: Sequence[int], sample: int) -> str:
    """The cache key of one generation: a hash of the settings, the prompt's token ids and the
    sample index, so a seed file that grows (or is reordered) regenerates only its new prompts,
    and corpora of other settings (a temperature, more samples) share the cache."""
    blob = json.dumps({"settings": settings, "prompt": [int(i) for i in prompt], "sample": int(sample)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _CorpusCache:
    """A directory of generations (`<key>.msgpack`) for one model and exit layer, with their
    generation seconds in corpus.json; emptied when the model or exit layer differs."""

    def __init__(self, directory: str | Path, split: SplitModel) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        owner = {"model_fingerprint": split.fingerprint, "exit_layer": split.exit_layer, "layout": "per-prompt-key"}
        meta_path = self.root / CORPUS_SETTINGS
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if self.meta.get("owner") != owner or not isinstance(self.meta.get("seconds"), dict):
            for old in self.root.glob("*.msgpack"):
                old.unlink()
            self.meta = {"owner": owner, "seconds": {}}
            meta_path.write_text(json.dumps(self.meta))

    def get(self, key: str) -> Trajectory | None:
        path = self.root / f"{key}.msgpack"
        return decode_trajectory(path.read_bytes(), _MAX_RECORD_BYTES) if path.is_file() else None

    def put(self, key: str, trajectory: Trajectory, seconds: float) -> None:
        (self.root / f"{key}.msgpack").write_bytes(encode_trajectory(trajectory, _MAX_RECORD_BYTES))
        self.meta["seconds"][key] = seconds
        (self.root / CORPUS_SETTINGS).write_text(json.dumps(self.meta))

    def seconds(self, key: str) -> float:
        return float(self.meta["seconds"].get(key, 0.0))


def generate_corpus(
    split: SplitModel,
    prompts: Sequence[Sequence[int]],
    config: WarmStartConfig,
    directory: str | Path | None = None,
    on_request: Callable[[int, int], None] | None = None,
    workers: int = 1,
    spec: ModelSpec | None = None,
) -> tuple[list[Trajectory], float]:
    """The corpus (one Trajectory per seed prompt and sample, in order) and the seconds its
    generations took (cached ones: as recorded when they were made; with workers, the sum over
    them, not the wall time). Each generation is cached in `directory` under `corpus_key` and, at
    temperature > 0, seeded by it, so it is the same whichever other prompts the seed file holds
    and whichever process makes it. `on_request(done, total)` after each one.

    `workers` > 1 generates the uncached ones in that many processes of one torch thread each,
    every one loading `spec` (the model `split` was loaded from; its drafter never matters: the
    corpus drafts from the context only). On a CPU, generation scales with cores, decoding one
    sequence per process does not (per core: ~83 tokens/s on an AVX2-only AMD EPYC, 164 on a Zen 4
    class one). `config.batch_size` > 1 makes batches instead (see it): each worker takes whole batches.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and spec is None:
        raise ValueError("generating the corpus in worker processes needs the ModelSpec the split was loaded from")
    settings = config.corpus_settings(batches_on_decoder(split))
    cache = _CorpusCache(directory, split) if directory is not None else None
    total = len(prompts) * config.samples_per_prompt
    corpus: list[Trajectory | None] = [None] * total
    spent = 0.0
    done = 0
    missing = []
    for index in range(total):
        prompt = prompts[index // config.samples_per_prompt]
        key = corpus_key(settings, prompt, index % config.samples_per_prompt)
        trajectory = cache.get(key) if cache is not None else None
        if trajectory is None:
            missing.append((index, list(prompt), key))
            continue
        corpus[index], spent, done = trajectory, spent + cache.seconds(key), done + 1
        if on_request is not None:
            on_request(done, total)
    for index, key, trajectory, seconds in _generations(split, missing, config, workers, spec):
        corpus[index], spent, done = trajectory, spent + seconds, done + 1
        if cache is not None:
            cache.put(key, trajectory, seconds)
        if on_request is not None:
            on_request(done, total)
    return corpus, spent  # type: ignore[return-value]  # every slot is filled above


def _generations(split: SplitModel, missing: list[tuple[int, list[int], str]], config: WarmStartConfig, workers: int,
                 spec: ModelSpec | None) -> Iterator[tuple[int, str, Trajectory, float]]:
    """(index, key, trajectory, seconds) for each (index, prompt, key) of `missing`, made in
    batches of `config.batch_size` in this process (`workers` 1) or in a pool of `workers`
    processes, in the order the batches finish."""
    batches = [missing[i : i + config.batch_size] for i in range(0, len(missing), config.batch_size)]
    if workers == 1 or len(batches) <= 1:
        maker = _BatchMaker(split)
        for batch in batches:
            for (index, _, key), (trajectory, seconds) in zip(batch, maker.make([(p, k) for _, p, k in batch], config)):
                yield index, key, trajectory, seconds
        return
    from concurrent.futures import as_completed

    with model_pool(spec, min(workers, len(batches))) as pool:
        futures = {pool.submit(_worker_make, [(p, k) for _, p, k in batch], config): batch for batch in batches}
        for future in as_completed(futures):
            for (index, _, key), (record, seconds) in zip(futures[future], future.result()):
                yield index, key, decode_trajectory(record, _MAX_RECORD_BYTES), seconds


class _BatchMaker:
    """Makes one batch of corpus generations on a split: decoded one by one (batch_size 1) or
    sampled together and then scored (above 1)."""

    def __init__(self, split: SplitModel) -> None:
        self.split = split
        self.decoder = SpeculativeDecoder(split)

    def make(self, batch: list[tuple[list[int], str]], config: WarmStartConfig) -> list[tuple[Trajectory, float]]:
        """(trajectory, seconds) per (prompt, key) of `batch`; a batch's seconds are shared equally."""
        if config.batch_size == 1:
            return [self._decode_one(prompt, key, config.decode) for prompt, key in batch]
        started = time.perf_counter()
        split = self.split
        if batches_on_decoder(split):
            results = self.decoder.generate_batch(
                [prompt for prompt, _ in batch], config.batch_decode, rows=config.batch_size,
                generators=[_key_generator(key) for _, key in batch], request_ids=[_request_id(key) for _, key in batch])
            out = [result.trajectory for result in results]
        else:
            pad = split.tokenizer.pad_token_id if split.tokenizer.pad_token_id is not None else min(split.eos_token_ids)
            seed = int(hashlib.sha256("".join(k for _, k in batch).encode()).hexdigest()[:15], 16)
            continuations = sample_continuations(split.model, [p for p, _ in batch], config.max_new_tokens,
                                                 config.temperature, split.eos_token_ids, pad, seed)
            out = [scored_trajectory(split, prompt + cont, len(prompt), config.record_topk, _request_id(key),
                                     config.temperature)
                   for (prompt, key), cont in zip(batch, continuations)]
        seconds = (time.perf_counter() - started) / len(batch)
        return [(trajectory, seconds) for trajectory in out]

    def _decode_one(self, prompt: list[int], key: str, decode: DecodeConfig) -> tuple[Trajectory, float]:
        """One corpus generation by the decoder, its sampling seeded by its cache key, and its seconds."""
        started = time.perf_counter()
        trajectory = self.decoder.generate(prompt, decode, generator=_key_generator(key),
                                           request_id=_request_id(key)).trajectory
        return trajectory, time.perf_counter() - started


def _key_generator(key: str) -> torch.Generator:
    """The generator one corpus generation samples with, seeded by its cache key (`corpus_key`)."""
    return torch.Generator().manual_seed(int(key[:15], 16))


def _request_id(key: str) -> str:
    return f"warmstart-{key}"


_worker_maker: _BatchMaker | None = None


def _worker_make(batch: list[tuple[list[int], str]], config: WarmStartConfig) -> list[tuple[bytes, float]]:
    """`_BatchMaker.make` in a `model_pool` worker (one maker per worker), the trajectories
    encoded to cross the process boundary."""
    global _worker_maker
    if _worker_maker is None:
        _worker_maker = _BatchMaker(worker_split())
    return [(encode_trajectory(t, _MAX_RECORD_BYTES), s) for t, s in _worker_maker.make(batch, config)]


@dataclass(frozen=True)
class CurvePoint:
    """Held-out agreement after training on the first `trajectories` of the corpus.

    corpus_tokens: tokens the seed prompts generated so far (prompt tokens excluded); positions:
    scored positions (prompt and generated) in that part; steps: optimiser steps taken so far.
    """

    trajectories: int
    corpus_tokens: int
    positions: int
    steps: int
    agreement: float
    seconds: float


def train_warm_start(
    split: SplitModel,
    corpus: Sequence[Trajectory],
    held_out: Sequence[AgreementTargets],
    config: WarmStartConfig,
    on_point: Callable[[CurvePoint], None] | None = None,
) -> tuple[Learner, list[CurvePoint]]:
    """Distil the verifier into `split`'s drafter over `corpus` (kl-only, see the module doc).

    The learner's replay holds the whole corpus; stage i adds the i-th of `chunks` slices and then
    takes epochs * (positions added) / batch_tokens steps sampled from everything added so far,
    so the drafter sees each position about `epochs` times by the end. Returns the learner (its
    split holds the trained drafter) and the curve: the untrained point, then one per stage.
    """
    if not corpus:
        raise ValueError("the warm-start corpus is empty")
    total = sum(t.num_scored for t in corpus)
    cfg = replace(config.learner, replay_capacity_tokens=max(total, config.learner.batch_tokens), seed=config.seed)
    learner = Learner(split, cfg, learner_id="warmstart")
    started = time.perf_counter()
    points: list[CurvePoint] = []
    seen = tokens = positions = 0

    def point() -> None:
        p = CurvePoint(seen, tokens, positions, learner.step, agreement(split, held_out).rate, time.perf_counter() - started)
        points.append(p)
        if on_point is not None:
            on_point(p)

    point()
    bounds = [round(len(corpus) * (i + 1) / config.chunks) for i in range(config.chunks)]
    stages = [(a, b) for a, b in zip([0] + bounds[:-1], bounds) if b > a]
    plan = [max(1, math.ceil(config.epochs * sum(t.num_scored for t in corpus[a:b]) / cfg.batch_tokens)) for a, b in stages]
    schedule = lr_schedule(learner.optimizer, config.lr_schedule, sum(plan))
    for (_, end), steps in zip(stages, plan):
        part = list(corpus[seen:end])
        learner.add(part)
        learner.refresh_draft_vocab()
        seen, positions = end, positions + sum(t.num_scored for t in part)
        tokens += sum(len(t.committed_tokens) for t in part)
        for _ in range(steps):
            if learner.train_step() is None:
                break
            schedule.step()
        point()
    return learner, points


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate over `total_steps` steps (the warm start's, or an offline probe's): "constant"
    (the optimiser's rates throughout) or "cosine" (from its rates down to 0 at the last step)."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def warm_start_record(config: WarmStartConfig, points: Sequence[CurvePoint], **extra) -> dict:
    """The JSON record of a warm-start run: settings, the curve and whatever `extra` adds (times, sizes)."""
    return {"config": asdict(config), "curve": [asdict(p) for p in points], **extra}  # json.dumps takes its tuples

