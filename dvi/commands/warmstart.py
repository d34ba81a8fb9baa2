"""`dvi warmstart`: train the drafter by self-distillation on the model's own generations
(learner/warmstart.py) and install it as the model's default drafter.

Writes DIR/adapter (the trained drafter, fp32), DIR/warmstart.json (settings, times, tokens, the
held-out agreement curve) and DIR/warmstart.png (the curve), and installs the adapter in the
user's cache (common/model/warm_start.py), where every later `dvi` command at this model and exit layer
starts from it unless `--adapter` says otherwise (`--no-install` skips that). `--ship` also
writes a bf16 copy where the package ships it (common/model/warmstarts/<fingerprint>-k<k>/: the default
model's ships with the project, made by the command in the README).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from common.core.config import DEFAULT_MODEL, DrafterConfig
from dvi import options
from dvi.app import app
from learner.config import LearnerConfig
from learner.warmstart import WarmStartConfig

SEEDS = Path(__file__).resolve().parents[1] / "data" / "warmstart_seeds.jsonl"


def bf16_copy(adapter: Path, target: Path, dtype: str = "bfloat16") -> int:
    """Copy a `save_adapter` directory to `target` with its float tensors cast to `dtype`; returns
    the bytes of the copied safetensors file."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "dvi_adapter.json"):
        shutil.copy(adapter / name, target / name)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    cast = getattr(torch, dtype)
    save_file({k: (v.to(cast) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              str(target / "adapter_model.safetensors"))
    return (target / "adapter_model.safetensors").stat().st_size


def plot_curve(points: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["corpus_tokens"] for p in points], [100 * p["agreement"] for p in points], marker="o")
    ax.set_xlabel("warm-start tokens generated (corpus)")
    ax.set_ylabel("held-out top-1 agreement (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@app.command()
def warmstart(
    out: str = typer.Option(..., "--out", help="Directory for adapter/, warmstart.json and warmstart.png."),
    model: options.Model = DEFAULT_MODEL,
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    draft_vocab_size: options.DraftVocabSize = DrafterConfig.draft_vocab_size,
    seeds: str = typer.Option(str(SEEDS), "--seeds", help="Seed instructions (JSONL, Spec-Bench or {\"prompt\"} lines)."),
    max_new_tokens: int = typer.Option(WarmStartConfig.max_new_tokens, "--max-new-tokens", help="New tokens generated per seed prompt."),
    temperature: float = typer.Option(WarmStartConfig.temperature, "--temperature", help="Corpus decoding temperature (0 = greedy)."),
    samples_per_prompt: int = typer.Option(WarmStartConfig.samples_per_prompt, "--samples-per-prompt", help="Generations per seed prompt."),
    self_seeds: int = typer.Option(WarmStartConfig.self_seeds, "--self-seeds", help="Seed instructions the model writes itself, added to --seeds."),
    batch_size: int = typer.Option(WarmStartConfig.batch_size, "--batch-size", help="Generations made together, seed instructions included (1: each decoded alone by the speculative decoder)."),
    epochs: float = typer.Option(WarmStartConfig.epochs, "--epochs", help="Passes over the corpus."),
    lr_schedule: str = typer.Option(WarmStartConfig.lr_schedule, "--lr-schedule", help="constant, or cosine (decayed to 0)."),
    head_lr: float = typer.Option(LearnerConfig.head_lr, "--head-lr", help="AdamW lr of the LM-head LoRA."),
    lora_lr: float = typer.Option(LearnerConfig.lora_lr, "--lora-lr", help="AdamW lr of the exit layer."),
    eval_prompts: int = typer.Option(24, "--eval-prompts", help="Held-out Spec-Bench prompts the curve is measured on."),
    eval_new_tokens: int = typer.Option(64, "--eval-new-tokens", help="Greedy tokens per held-out prompt."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus cache directory (default: in the dvi cache)."),
    install: bool = typer.Option(True, "--install/--no-install", help="Make it this model's default drafter."),
    ship: bool = typer.Option(False, "--ship/--no-ship", help="Also write the bf16 copy this package ships (common/model/warmstarts/)."),
    seed: int = typer.Option(WarmStartConfig.seed, "--seed"),
    workers: int = typer.Option(1, "--workers", help="Processes writing seed instructions and generating the corpus, one torch thread each (up to one per core)."),
    threads: options.Threads = None,
) -> None:
    """Warm-start the drafter on the model's own generations from the shipped seed instructions."""
    options.check_threads(threads)
    if workers < 1:
        raise typer.BadParameter(f"must be >= 1, got {workers}", param_hint="--workers")
    if batch_size < 1:
        raise typer.BadParameter(f"must be >= 1, got {batch_size}", param_hint="--batch-size")
    if self_seeds < 0:
        raise typer.BadParameter(f"must be >= 0, got {self_seeds}", param_hint="--self-seeds")
    with options.torch_threads(threads):
        _run(**locals())


def _save(split, drafter, targets, out_dir: Path, install: bool, ship: bool, model: str) -> dict:
    """Write OUT/adapter; with `install`, make it this model's default drafter in the user's cache;
    with `ship`, write the bf16 copy this package ships and measure its agreement as loaded.
    Returns the sizes (and the shipped copy's agreement) for warmstart.json."""
    from common.decoding.agreement import agreement
    from common.model.warm_start import SHIPPED_DIR, installed_warm_start_dir, warm_start_name

    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = split.save_adapter(out_dir / "adapter")
    sizes = {"adapter_bytes_fp32": (adapter / "adapter_model.safetensors").stat().st_size}
    if install:
        target = installed_warm_start_dir(split.fingerprint, split.exit_layer)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(adapter, target)
        print(f"warmstart: installed as the default drafter of '{model}' at exit layer {split.exit_layer}: {target}")
    if ship:
        shipped = SHIPPED_DIR / warm_start_name(split.fingerprint, split.exit_layer)
        sizes["shipped_bytes_bf16"] = bf16_copy(adapter, shipped)
        check = split.sibling(drafter)
        check.load_adapter(shipped)
        print(f"warmstart: shipped a bf16 copy ({sizes['shipped_bytes_bf16']} bytes) in {shipped}")
        sizes["shipped_agreement"] = agreement(check, targets).rate
    return sizes


def _seeds_name(seeds) -> str:
    """How the record names the seed file: the shipped one by its place in the package (the same
    on every machine), any other by the path given."""
    return SEEDS.relative_to(SEEDS.parents[2]).as_posix() if Path(seeds).resolve() == SEEDS else str(seeds)


def _self_seeds(split, config: WarmStartConfig, out_dir: Path, corpus_dir: Path, workers: int, spec) -> list[str]:
    """The model's own seed instructions (`config.self_seeds` of them), written on `workers`
    processes, every attempt cached beside the corpus (a rerun writes none again), and also
    written to OUT/self_seeds.jsonl ({"prompt"} lines, readable back with --seeds)."""
    from learner.self_seeds import self_instruct_prompts

    if not config.self_seeds:
        return []
    if not getattr(split.tokenizer, "chat_template", None):  # the recipe continues a chat template's user turn
        print("warmstart: this model has no chat template, so it writes no seed instructions: the shipped seeds only", flush=True)
        return []
    from rich.console import Console

    from dvi.progress import progress_bar

    started = time.perf_counter()
    with progress_bar(Console(stderr=True)) as progress:
        task = progress.add_task("seed instructions", total=config.self_seeds, now="")
        written = self_instruct_prompts(
            split, config.self_seeds, seed=config.seed, workers=workers, spec=spec, cache_dir=corpus_dir,
            rows=config.batch_size,
            on_progress=lambda kept, total: progress.update(task, completed=kept, now=f"{kept}/{total}"),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "self_seeds.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in written))
    print(f"warmstart: the model wrote {len(written)} seed instructions in {time.perf_counter() - started:.0f} s", flush=True)
    return written


def _run(out, model, exit_layer, draft_vocab_size, seeds, max_new_tokens, temperature, samples_per_prompt, self_seeds, batch_size, epochs,
         lr_schedule, head_lr, lora_lr, eval_prompts, eval_new_tokens, corpus, install, ship, seed, workers, threads) -> None:
    from common.decoding.agreement import greedy_targets
    from common.core.config import ModelSpec
    from common.model.split import SplitModel
    from common.model.loading import cache_dir
    from common.core.prompts import encode_prompt, load_prompts
    from dvi.bench.learning import interleave_categories, split_train_eval
    from dvi.bench.speed import machine_info
    from dvi.data import SPEC_BENCH_DEV
    from dvi.progress import progress_bar
    from learner.warmstart import generate_corpus, train_warm_start, warm_start_record

    started = time.perf_counter()
    config = WarmStartConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, samples_per_prompt=samples_per_prompt,
        self_seeds=self_seeds, batch_size=batch_size, epochs=epochs, lr_schedule=lr_schedule, seed=seed,
    )
    config = replace(config, learner=replace(config.learner, head_lr=head_lr, lora_lr=lora_lr))
    drafter = DrafterConfig(exit_layer=exit_layer, draft_vocab_size=draft_vocab_size)
    spec = ModelSpec(model=model, drafter=drafter, warm_start=False)
    split = SplitModel.load(spec)
    seed_prompts = interleave_categories(load_prompts(seeds))  # any prefix of the corpus covers every kind
    prompt_ids = [encode_prompt(split.tokenizer, p.text) for p in seed_prompts]
    corpus_dir = Path(corpus) if corpus else cache_dir() / "warmstart" / f"{split.fingerprint}-k{split.exit_layer}" / "corpus"
    written = _self_seeds(split, config, Path(out), corpus_dir, workers, spec)
    prompt_ids += [encode_prompt(split.tokenizer, text) for text in written]

    from rich.console import Console

    generation_started = time.perf_counter()
    with progress_bar(Console(stderr=True)) as progress:
        task = progress.add_task("warm-start corpus", total=len(prompt_ids) * samples_per_prompt, now="")
        trajectories, generation_seconds = generate_corpus(
            split, prompt_ids, config, corpus_dir,
            on_request=lambda done, total: progress.update(task, completed=done, now=f"{done}/{total}"),
            workers=workers, spec=spec,
        )
    generation_wall_seconds = time.perf_counter() - generation_started
    held = split_train_eval(load_prompts(SPEC_BENCH_DEV))[1][:eval_prompts]
    eval_started = time.perf_counter()
    targets = greedy_targets(split, [encode_prompt(split.tokenizer, p.text) for p in held], eval_new_tokens)
    eval_setup_seconds = time.perf_counter() - eval_started

    train_started = time.perf_counter()
    learner, points = train_warm_start(
        split, trajectories, targets, config,
        on_point=lambda p: print(f"warmstart: {p.corpus_tokens} corpus tokens, step {p.steps}: held-out agreement {p.agreement:.3f}", flush=True),
    )
    train_seconds = time.perf_counter() - train_started

    out_dir = Path(out)
    sizes = _save(split, drafter, targets, out_dir, install, ship, model)
    record = warm_start_record(
        config, points,
        model=model, exit_layer=exit_layer, draft_vocab_size=draft_vocab_size, seeds=_seeds_name(seeds),
        seed_prompts=len(seed_prompts), self_seed_prompts=len(written), corpus_trajectories=len(trajectories),
        corpus_tokens=sum(len(t.committed_tokens) for t in trajectories),
        corpus_positions=sum(t.num_scored for t in trajectories),
        generation_seconds=generation_seconds, generation_workers=workers, generation_wall_seconds=generation_wall_seconds,
        train_seconds=train_seconds, eval_setup_seconds=eval_setup_seconds,
        total_seconds=time.perf_counter() - started,
        held_out={"prompts": len(held), "new_tokens": eval_new_tokens, "positions": sum(t.num_scored for t in targets),
                  "source": "Spec-Bench dev, second half of every category (dvi.bench.learning.split_train_eval), first N interleaved"},
        machine={**machine_info("cpu"), "threads": threads, "load_average_at_end": os.getloadavg()},
        **sizes,
    )
    (out_dir / "warmstart.json").write_text(json.dumps(record, indent=2))
    plot_curve(record["curve"], out_dir / "warmstart.png",
               f"{model}, exit layer {exit_layer}: warm start by self-distillation")
    first, last = points[0].agreement, points[-1].agreement
    print(f"warmstart: held-out agreement {first:.3f} -> {last:.3f} ({record['corpus_tokens']} corpus tokens, "
          f"generation {generation_seconds:.0f} s, training {train_seconds:.0f} s); wrote {out_dir}")
