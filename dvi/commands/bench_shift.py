"""`dvi bench shift`: learn online on one task's traffic, switch task, measure how fast acceptance recovers."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig
from dvi import options
from dvi.bench.shift import ShiftSettings
from dvi.app import bench_app
from dvi.data import SPEC_BENCH_DEV
from dvi.progress import progress_bar


@bench_app.command("shift")
def shift(
    out: str = typer.Option(..., "--out", help="Directory for shift.json, shift.md and shift.png."),
    source: str = typer.Option(ShiftSettings.source, "--from", help="Spec-Bench task served first."),
    target: str = typer.Option(ShiftSettings.target, "--to", help="Spec-Bench task the traffic switches to."),
    prompts: str = typer.Option(str(SPEC_BENCH_DEV), "--prompts", help="Spec-Bench-format JSONL (default: the shipped dev prompts)."),
    from_requests: Optional[int] = typer.Option(None, "--from-requests", help="Requests before the switch (default: each source prompt once; more cycle)."),
    to_requests: Optional[int] = typer.Option(None, "--to-requests", help="Requests after the switch (default: each target prompt once; more cycle)."),
    model: options.Model = DEFAULT_MODEL,
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Starting drafter adapter (default: the default drafter)."),
    schedule: str = typer.Option(ShiftSettings.schedule, "--schedule", help="kl-only, kl-rl or rl-only."),
    max_new_tokens: int = typer.Option(ShiftSettings.decode.max_new_tokens, "--max-new-tokens", help="Most new tokens per request."),
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: options.Gamma = DecodeConfig.gamma,
    context_tokens: options.ContextTokens = DecodeConfig.context_tokens,
    draft_vocab_size: options.DraftVocabSize = DrafterConfig.draft_vocab_size,
    learn_batch_tokens: int = typer.Option(ShiftSettings.learn_batch_tokens, "--learn-batch-tokens", help="Scored positions per optimiser step."),
    learn_updates_per_request: int = typer.Option(ShiftSettings.learn_updates_per_request, "--learn-updates-per-request", help="Optimiser steps per request."),
    window: int = typer.Option(ShiftSettings.window, "--window", help="Requests pooled per curve point."),
    threads: options.Threads = None,
) -> None:
    """Serve --from traffic while learning, switch to --to traffic without a restart, and report the
    tokens taken to recover to 90% of the final acceptance on the new task."""
    options.check_threads(threads)
    if adapter and not Path(adapter).is_dir():
        raise ValueError(f"--adapter: adapter directory not found: {adapter}")
    settings = ShiftSettings(
        prompts=prompts, source=source, target=target, from_requests=from_requests, to_requests=to_requests,
        model=model, adapter=adapter, schedule=schedule,
        decode=replace(ShiftSettings.decode, max_new_tokens=max_new_tokens, gamma=gamma, context_tokens=context_tokens),
        drafter=DrafterConfig(exit_layer=exit_layer, draft_vocab_size=draft_vocab_size),
        learn_batch_tokens=learn_batch_tokens, learn_updates_per_request=learn_updates_per_request, window=window,
    )
    with options.torch_threads(threads):
        _run(settings, Path(out))


def _task_requests(split, settings: ShiftSettings) -> tuple[list[list[int]], list[list[int]], list]:
    """(source request ids, target request ids, skipped): each task's prompts in file order,
    encoded and checked, cycled to the requested counts."""
    from common.core.prompts import encode_workload, load_prompts, spec_bench_task
    from common.decoding.speculative import SpeculativeDecoder

    questions = load_prompts(settings.prompts)
    checker = SpeculativeDecoder(split)
    decode = DecodeConfig(gamma=0, max_new_tokens=settings.decode.max_new_tokens)
    out, skipped = [], []
    for task, count in ((settings.source, settings.from_requests), (settings.target, settings.to_requests)):
        mine = [q for q in questions if spec_bench_task(q.category) == task]
        if not mine:
            tasks = sorted({spec_bench_task(q.category) for q in questions})
            raise ValueError(f"no prompt of task {task!r} in {settings.prompts}; its tasks: {', '.join(tasks)}")
        kept, lost = encode_workload(mine, split.tokenizer, lambda ids: checker.check_request(ids, decode),
                                     max_new_tokens=settings.decode.max_new_tokens, context=split.max_positions,
                                     what=f"{task} prompts")
        ids = [list(i) for _, i in kept]
        n = count or len(ids)
        out.append([ids[i % len(ids)] for i in range(n)])
        skipped += lost
    return out[0], out[1], skipped


def _run(settings: ShiftSettings, out: Path) -> None:
    from rich.console import Console

    from common.core.config import ModelSpec
    from common.model.split import SplitModel
    from dvi.bench.online import learn_online
    from dvi.bench.shift import SOURCE, TARGET, RequestRecord, write_reports
    from dvi.bench.speed import machine_info

    spec = ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                     drafter=settings.drafter, engine=settings.engine)
    split = SplitModel.load(spec)
    if settings.adapter:
        split.load_adapter(settings.adapter)
    source_ids, target_ids, skipped = _task_requests(split, settings)
    records: list[RequestRecord] = []
    console = Console(stderr=True)
    with progress_bar(console) as progress:
        task = progress.add_task(f"shift {settings.source} -> {settings.target}",
                                 total=len(source_ids) + len(target_ids), now="")

        def on_request(result) -> None:
            phase = SOURCE if len(records) < len(source_ids) else TARGET
            records.append(RequestRecord(phase, len(result.token_ids), result.verifier_passes, result.drafted,
                                         result.accepted, result.context_drafted, result.context_accepted,
                                         result.weight_version))
            progress.update(task, advance=1, now=f"{phase} tau {result.tau:.2f}")

        summary = learn_online(split, settings.schedule, source_ids + target_ids, settings,
                               seed=settings.seed, on_request=on_request)
    extra = {"learning": summary.as_dict(), "skipped_requests": len(skipped), "skipped": [s.as_dict() for s in skipped]}
    markdown = write_reports(out, settings, records, machine_info(str(split.device)), extra)
    sys.stdout.write(markdown + "\n")
    console.print(f"wrote {out / 'shift.json'}, shift.md, shift.png")
