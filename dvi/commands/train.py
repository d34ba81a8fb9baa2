"""`dvi train-local` (single-process training loop) and `dvi bench learning` (schedules compared).

Both run `learner.local.train_local` (the service's `learner.loop.LearnerLoop` over an in-memory transport)
in this process: the decoder drafts with the live adapter,
the learner trains it from the recorded trajectories. Prompts are split by
`dvi.bench.learning.split_train_eval` when one file serves both roles (see that module).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig
from common.core.prompts import skipped_summary
from dvi import options
from dvi.app import app, bench_app
from dvi.progress import progress_bar
from learner.local import LocalLoopConfig
from learner.config import SCHEDULE_KINDS, LearnerConfig, ScheduleConfig


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs besides its prompts (the CLI flags, validated)."""

    model: str = DEFAULT_MODEL
    """Alias, local HF directory or hub id of the frozen base model."""
    exit_layer: int = DrafterConfig.exit_layer
    """k: the drafter runs decoder layers [0, k)."""
    gamma: int = 4
    """Most tokens drafted per block when evaluating (and training, unless train_gamma)."""
    train_gamma: int | None = None
    """Most tokens drafted per block on training requests (None = gamma); 1 records the same committed-context
    positions at a fraction of the drafting cost while acceptance is low."""
    max_new_tokens: int = 64
    """Most new tokens per request, training and evaluation."""
    truncate_prompts: bool = False
    """A prompt too long for the context: keep its last tokens (False: skip it, counted in learning.json)."""
    steps: int = 200
    """Optimiser steps to reach (per schedule in the benchmark)."""
    updates_per_request: int = 4
    """K: optimiser steps after each training request."""
    publish_every: int = LocalLoopConfig.publish_every
    """Publish a new weight version every N optimiser steps."""
    eval_every: int = 50
    """Evaluate held-out tau and acceptance every E optimiser steps."""
    head_lr: float = LearnerConfig.head_lr
    """AdamW lr of the LM-head LoRA (the service's, LearnerConfig's: one source for both)."""
    lora_lr: float = LearnerConfig.lora_lr
    """AdamW lr of the exit layer (the service's, LearnerConfig's)."""
    batch_tokens: int = LearnerConfig.batch_tokens
    """Drafted tokens per optimiser step."""
    warmup_steps: int = ScheduleConfig.warmup_steps
    """kl-rl: KL-only steps before the ramp."""
    ramp_steps: int = ScheduleConfig.ramp_steps
    """kl-rl: steps of the linear ramp to the RL mix."""
    staleness_policy: str = "importance"
    """drop or importance. In-process, versions move every `publish_every` steps, so "drop" with a small
    max_staleness would shrink the replay to the last few requests; "importance" keeps the whole FIFO."""
    max_staleness: int = LearnerConfig.max_staleness
    """Versions a trajectory may lag before it is stale."""
    seed: int = 0
    """Seed of replay sampling and of sampled decoding."""
    dtype: str = "float32"
    """Torch dtype of the base weights."""
    device: str = "cpu"
    """Torch device."""

    def learner_config(self, schedule: str) -> LearnerConfig:
        if schedule not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULE_KINDS)}")
        explicit = (self.head_lr, self.lora_lr) != (LearnerConfig.head_lr, LearnerConfig.lora_lr)
        return LearnerConfig(
            schedule=ScheduleConfig(kind=schedule, warmup_steps=self.warmup_steps, ramp_steps=self.ramp_steps),
            head_lr=self.head_lr,
            lora_lr=self.lora_lr,
            fine_tune_lr=None if explicit else LearnerConfig.fine_tune_lr,  # rates given apply from any start
            batch_tokens=self.batch_tokens,
            replay_capacity_tokens=max(LearnerConfig.replay_capacity_tokens, self.batch_tokens),
            staleness_policy=self.staleness_policy,
            max_staleness=self.max_staleness,
            seed=self.seed,
        )

    def loop_config(self):
        return LocalLoopConfig(
            steps=self.steps,
            updates_per_request=self.updates_per_request,
            publish_every=self.publish_every,
            eval_every=self.eval_every,
            decode=DecodeConfig(gamma=self.gamma if self.train_gamma is None else self.train_gamma,
                                max_new_tokens=self.max_new_tokens),
            eval_decode=DecodeConfig(gamma=self.gamma, max_new_tokens=self.max_new_tokens),
            seed=self.seed,
        )

    def validate(self) -> "TrainSettings":
        from common.core.config import ModelSpec

        ModelSpec(model=self.model, dtype=self.dtype, device=self.device, drafter=DrafterConfig(exit_layer=self.exit_layer))
        self.loop_config()
        self.learner_config("kl-rl")
        return self


def _encode_all(split, prompts, settings: "TrainSettings", what: str) -> tuple[list[list[int]], list]:
    """(token ids of every servable prompt, [SkippedRequest]) — see common.core.prompts.encode_workload."""
    from common.core.prompts import encode_workload
    from common.decoding.speculative import SpeculativeDecoder

    decode = DecodeConfig(gamma=0, max_new_tokens=settings.max_new_tokens)
    checker = SpeculativeDecoder(split)
    kept, skipped = encode_workload(
        prompts, split.tokenizer, lambda ids: checker.check_request(ids, decode), max_new_tokens=settings.max_new_tokens,
        context=split.max_positions, truncate=settings.truncate_prompts, what=what,
    )
    return [ids for _, ids in kept], skipped


def load_prompt_halves(prompts: str, eval_prompts: str | None, train_limit: int | None, eval_limit: int | None):
    """(train, eval) Prompt lists: one file is split in halves; two files are each interleaved."""
    from common.core.prompts import load_prompts
    from dvi.bench.learning import interleave_categories, split_train_eval

    for flag, value in (("--train-limit", train_limit), ("--eval-limit", eval_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if eval_prompts is None or Path(eval_prompts).resolve() == Path(prompts).resolve():
        train, held_out = split_train_eval(load_prompts(prompts))
    else:
        train = interleave_categories(load_prompts(prompts))
        held_out = interleave_categories(load_prompts(eval_prompts))
    return train[:train_limit], held_out[:eval_limit]


def _point_text(p: dict) -> str:
    return f"tau {p['tau']:.3f} acc {p['acceptance']:.3f} @ {p['tokens_seen']} tok"


def _command_line() -> str:
    return "dvi " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""


# ------------------------------------------------------------------ options both commands share
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Evaluate held-out tau and acceptance every E optimiser steps.")]
EvalLimit = Annotated[Optional[int], typer.Option("--eval-limit", help="Held-out prompts evaluated (a fixed, category-interleaved subset).")]
TrainLimit = Annotated[Optional[int], typer.Option("--train-limit", help="Use only the first N training prompts (category-interleaved).")]
TrainGammaOpt = Annotated[Optional[int], typer.Option(
    "--train-gamma", help="Most tokens drafted per block on training requests (default: --gamma). 1 records the same "
    "committed-context positions at a fraction of the drafting cost while acceptance is low.")]
GammaOpt = Annotated[int, typer.Option("--gamma", help="Most tokens drafted per block (evaluation, and training unless --train-gamma).")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens per request, training and evaluation.")]
UpdatesPerRequest = Annotated[int, typer.Option("--updates-per-request", help="K: optimiser steps after each training request.")]
HeadLr = Annotated[float, typer.Option("--head-lr", help="AdamW lr of the LM-head LoRA.")]
LoraLr = Annotated[float, typer.Option("--lora-lr", help="AdamW lr of the exit layer.")]
BatchTokens = Annotated[int, typer.Option("--batch-tokens", help="Drafted tokens per optimiser step.")]
WarmupSteps = Annotated[int, typer.Option("--warmup-steps", help="kl-rl: KL-only steps before the ramp.")]
RampSteps = Annotated[int, typer.Option("--ramp-steps", help="kl-rl: steps of the linear ramp to the RL mix.")]
StalenessPolicy = Annotated[str, typer.Option("--staleness-policy", help="drop or importance (keep old trajectories).")]
MaxStaleness = Annotated[int, typer.Option("--max-staleness", help="Versions a trajectory may lag before it is stale.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of replay sampling and of sampled decoding.")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16 base weights (the exit head trains in float32 logits).")]
Device = Annotated[str, typer.Option("--device", help="Torch device, e.g. cpu or cuda:0.")]


def settings_from(options_given: dict) -> TrainSettings:
    """The validated `TrainSettings` of a command's options (its `locals()`): every field the
    command has an option for, the dataclass defaults for the rest."""
    return TrainSettings(**options.config_fields(TrainSettings, options_given)).validate()


# --------------------------------------------------------------------------- dvi train-local
@app.command("train-local")
def train_local_command(
    prompts: str = typer.Option(..., "--prompts", help="Spec-Bench-format JSONL of training prompts (first turn only)."),
    steps: int = typer.Option(..., "--steps", help="Train until the learner has taken N optimiser steps (a resumed run continues to N)."),
    out: str = typer.Option(..., "--out", help="Directory for adapter/, checkpoint/, learning.json and learning.png."),
    eval_prompts: Optional[str] = typer.Option(
        None, "--eval-prompts",
        help="Held-out prompts. The same file as --prompts (or omitted): split per category, first half trains, second half evaluates.",
    ),
    model: options.Model = DEFAULT_MODEL,
    schedule: str = typer.Option("kl-rl", "--schedule", help="kl-rl, kl-only or rl-only."),
    eval_every: EvalEvery = TrainSettings.eval_every,
    eval_limit: EvalLimit = 16,
    train_limit: TrainLimit = None,
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: GammaOpt = TrainSettings.gamma,
    train_gamma: TrainGammaOpt = TrainSettings.train_gamma,
    max_new_tokens: MaxNewTokens = TrainSettings.max_new_tokens,
    truncate_prompts: options.TruncatePrompts = TrainSettings.truncate_prompts,
    updates_per_request: UpdatesPerRequest = TrainSettings.updates_per_request,
    publish_every: options.PublishEvery = TrainSettings.publish_every,
    head_lr: HeadLr = TrainSettings.head_lr,
    lora_lr: LoraLr = TrainSettings.lora_lr,
    batch_tokens: BatchTokens = TrainSettings.batch_tokens,
    warmup_steps: WarmupSteps = TrainSettings.warmup_steps,
    ramp_steps: RampSteps = TrainSettings.ramp_steps,
    staleness_policy: StalenessPolicy = TrainSettings.staleness_policy,
    max_staleness: MaxStaleness = TrainSettings.max_staleness,
    seed: Seed = TrainSettings.seed,
    resume: Optional[str] = typer.Option(None, "--resume", help="A checkpoint directory (or a run directory holding checkpoint/) to continue from."),
    dtype: Dtype = TrainSettings.dtype,
    device: Device = TrainSettings.device,
    threads: options.Threads = None,
) -> None:
    """Train the drafter in this process on its own traffic; evaluate held-out tau as it learns."""
    settings = settings_from(locals())
    learner_config = settings.learner_config(schedule)
    train, held_out = load_prompt_halves(prompts, eval_prompts, train_limit, eval_limit)
    checkpoint = _resolve_checkpoint(resume) if resume else None
    with options.torch_threads(threads):
        _train_local(settings, learner_config, schedule, train, held_out, checkpoint, Path(out))


def _resolve_checkpoint(resume: str) -> Path:
    from common.core.errors import AdapterError
    from learner.checkpoint import META_FILE

    path = Path(resume)
    if (path / META_FILE).is_file():
        return path
    if (path / "checkpoint" / META_FILE).is_file():
        return path / "checkpoint"
    raise AdapterError(f"--resume: no learner checkpoint in {resume}")


def _resume(learner, checkpoint: Path | None) -> tuple[list[dict], int]:
    """Load `checkpoint` into `learner` (AdapterError before anything is written) and return the
    learning curve recorded beside it up to the learner's step, with its traffic tokens so far;
    ([], 0) without a checkpoint or a readable curve."""
    import json

    if checkpoint is None:
        return [], 0
    learner.load_checkpoint(checkpoint)
    history = checkpoint.parent / "learning.json"
    if not history.is_file():
        return [], 0
    try:
        points = [p for p in json.loads(history.read_text()).get("points", []) if p["step"] <= learner.step]
    except (ValueError, KeyError, TypeError, AttributeError):
        return [], 0
    return points, int(points[-1]["traffic_tokens"]) if points else 0


def _train_local(settings: TrainSettings, learner_config, schedule: str, train, held_out, checkpoint: Path | None, out: Path) -> None:
    from rich.console import Console

    from common.core.config import ModelSpec
    from common.model.split import SplitModel
    from dvi.bench.learning import plot_learning, write_json
    from learner.learner import Learner
    from learner.local import train_local

    spec = ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                     drafter=DrafterConfig(exit_layer=settings.exit_layer))
    split = SplitModel.load(spec)
    train_ids, train_skipped = _encode_all(split, train, settings, "training prompts")
    eval_ids, eval_skipped = _encode_all(split, held_out, settings, "held-out prompts")
    learner = Learner(split, learner_config)
    points, traffic = _resume(learner, checkpoint)
    console = Console(stderr=True)
    settings_record = {**asdict(settings), "schedule": schedule, "train_prompts": len(train_ids),
                       "eval_prompts": len(eval_ids), "learner": asdict(learner_config), "command": _command_line()}
    with progress_bar(console) as progress:
        task = progress.add_task(f"train {schedule}", total=settings.steps, completed=learner.step, now="evaluating")

        def on_step(stats: dict) -> None:
            progress.update(task, completed=int(stats["step"]), now=f"{stats['phase']} kl {stats['kl']:.3f}")

        def on_point(p: dict) -> None:
            console.print(f"step {p['step']}: {_point_text(p)}")

        points += train_local(
            learner, train_ids, eval_ids, settings.loop_config(),
            evaluate_at_start=not (points and points[-1]["step"] == learner.step),
            traffic_tokens=traffic, on_step=on_step, on_point=on_point,
        )

    out.mkdir(parents=True, exist_ok=True)
    split.save_adapter(out / "adapter")
    learner.save_checkpoint(out / "checkpoint")
    write_json(out / "learning.json", {"settings": settings_record, "schedule": schedule,
                                       **skipped_summary(train_skipped + eval_skipped),
                                       "counters": learner.counters(), "points": points})
    plot_learning({schedule: points}, out / "learning.png",
                  f"{settings.model} exit layer {settings.exit_layer}, {schedule}, {len(eval_ids)} held-out prompts")
    first, last = points[0], points[-1]
    sys.stdout.write(
        f"{schedule}: tau {first['tau']:.3f} -> {last['tau']:.3f}, acceptance {first['acceptance']:.3f} -> "
        f"{last['acceptance']:.3f} after {last['step']} steps ({last['tokens_seen']} drafted tokens seen)\n"
    )
    console.print(f"wrote {out / 'adapter'}, {out / 'checkpoint'}, learning.json, learning.png")


# --------------------------------------------------------------------------- dvi bench learning
@bench_app.command("learning")
def learning_command(
    prompts: str = typer.Option(..., "--prompts", help="Spec-Bench JSONL: per category the first half trains, the second half evaluates."),
    steps: int = typer.Option(..., "--steps", help="Optimiser steps per schedule."),
    out: str = typer.Option(..., "--out", help="Directory for learning.json, learning.md and learning.png."),
    adapters_out: Optional[str] = typer.Option(
        None, "--adapters-out", help="Where each schedule's adapter goes, as <dir>/<schedule>/adapter (default: --out)."
    ),
    schedules: str = typer.Option("kl-rl,kl-only", "--schedules", help="Comma-separated schedules to compare."),
    model: options.Model = DEFAULT_MODEL,
    eval_every: EvalEvery = TrainSettings.eval_every,
    eval_limit: EvalLimit = 16,
    train_limit: TrainLimit = None,
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: GammaOpt = TrainSettings.gamma,
    train_gamma: TrainGammaOpt = TrainSettings.train_gamma,
    max_new_tokens: MaxNewTokens = TrainSettings.max_new_tokens,
    truncate_prompts: options.TruncatePrompts = TrainSettings.truncate_prompts,
    updates_per_request: UpdatesPerRequest = TrainSettings.updates_per_request,
    publish_every: options.PublishEvery = TrainSettings.publish_every,
    head_lr: HeadLr = TrainSettings.head_lr,
    lora_lr: LoraLr = TrainSettings.lora_lr,
    batch_tokens: BatchTokens = TrainSettings.batch_tokens,
    warmup_steps: WarmupSteps = TrainSettings.warmup_steps,
    ramp_steps: RampSteps = TrainSettings.ramp_steps,
    staleness_policy: StalenessPolicy = TrainSettings.staleness_policy,
    max_staleness: MaxStaleness = TrainSettings.max_staleness,
    seed: Seed = TrainSettings.seed,
    dtype: Dtype = TrainSettings.dtype,
    device: Device = TrainSettings.device,
    threads: options.Threads = None,
) -> None:
    """Train each schedule from the same untrained drafter and compare held-out tau as it learns."""
    names = [s.strip() for s in schedules.split(",")]
    if not names or "" in names or len(set(names)) != len(names):
        raise ValueError(f"--schedules must be distinct comma-separated names, got {schedules!r}")
    settings = settings_from(locals())
    configs = {name: settings.learner_config(name) for name in names}
    train, held_out = load_prompt_halves(prompts, None, train_limit, eval_limit)
    with options.torch_threads(threads):
        _bench_learning(settings, configs, train, held_out, Path(out), Path(adapters_out or out))


def _bench_learning(settings: TrainSettings, configs: dict, train, held_out, out: Path, adapters_out: Path) -> None:
    import torch
    from rich.console import Console

    from common.core.config import ModelSpec
    from common.model.split import SplitModel
    from common.decoding.speculative import SpeculativeDecoder
    from dvi.bench.learning import write_bench_reports
    from learner.learner import Learner
    from learner.local import evaluate, train_local

    spec = ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                     drafter=DrafterConfig(exit_layer=settings.exit_layer))
    split = SplitModel.load(spec)
    train_ids, train_skipped = _encode_all(split, train, settings, "training prompts")
    eval_ids, eval_skipped = _encode_all(split, held_out, settings, "held-out prompts")
    loop = settings.loop_config()
    untrained = split.adapter_state()
    console = Console(stderr=True)
    console.print(f"{len(train_ids)} training prompts, {len(eval_ids)} held-out prompts; evaluating the untrained drafter")
    start = evaluate(SpeculativeDecoder(split), eval_ids, loop.held_out_decode)
    console.print(f"untrained: {_point_text({**start, 'tokens_seen': 0})}")
    runs: dict[str, list[dict]] = {}
    with progress_bar(console) as progress:
        for name, config in configs.items():
            split.load_adapter_state(untrained, version=0)  # every schedule starts from the same drafter
            torch.manual_seed(settings.seed)
            learner = Learner(split, config, learner_id=f"bench-{name}")
            task = progress.add_task(name, total=settings.steps, now="")

            def on_step(stats: dict, task=task) -> None:
                progress.update(task, completed=int(stats["step"]), now=f"{stats['phase']} kl {stats['kl']:.3f}")

            def on_point(p: dict, name=name) -> None:
                console.print(f"{name} step {p['step']}: {_point_text(p)}")

            runs[name] = train_local(learner, train_ids, eval_ids, loop, initial_eval=start, on_step=on_step, on_point=on_point)
            split.save_adapter(adapters_out / name / "adapter")
    record = {**asdict(settings), "schedules": list(configs), "train_prompts": len(train_ids),
              "eval_prompts": len(eval_ids), "learner": {n: asdict(c) for n, c in configs.items()},
              "command": _command_line()}
    markdown = write_bench_reports(out, record, runs, skipped_summary(train_skipped + eval_skipped))
    sys.stdout.write(markdown + "\n")
    console.print(f"wrote {out / 'learning.json'}, learning.md, learning.png; adapters under {adapters_out}/<schedule>/adapter")
