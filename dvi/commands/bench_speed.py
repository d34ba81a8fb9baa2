"""`dvi bench speed`: tokens/s, speedup over HF greedy, tau and losslessness of each decoding method."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig, ModelSpec
from common.core.prompts import spec_bench_task
from dvi import options
from dvi.bench.speed import SpeedSettings
from dvi.app import bench_app
from dvi.progress import progress_bar

_METHODS_HELP = (
    "Comma-separated built-in methods, in order: hf_ar (HF generate, the reference), ar (our loop, gamma 0), "
    "hf_prompt_lookup, hf_early_exit, dvi_context (our decoder, context drafting only), dvi (the default drafter, "
    "frozen, or --adapter); and the peers llama_cpp, llama_cpp_lookup (pip install -e '.[peers]'). "
    "Default: the first six."
)


def parse_names(flag: str, text: str | None) -> tuple[str, ...] | None:
    """'hf_ar, dvi' -> ('hf_ar', 'dvi'); None stays None."""
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not any(names) or "" in names:
        raise ValueError(f"{flag} must be a comma-separated list of names, got {text!r}")
    return names


def parse_methods(text: str | None) -> tuple[str, ...] | None:
    """'hf_ar, dvi' -> ('hf_ar', 'dvi'); None stays None (all methods)."""
    return parse_names("--methods", text)


def parse_variants(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """['dvi_kl_only=runs/kl/adapter'] -> (('dvi_kl_only', 'runs/kl/adapter'),)."""
    variants = []
    for item in items or []:
        name, sep, directory = item.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ValueError(f"--variant takes NAME=ADAPTER_DIR, got {item!r}")
        variants.append((name.strip(), directory.strip()))
    return tuple(variants)


def _check_adapter_dir(flag: str, directory: str) -> None:
    if not Path(directory).is_dir():
        raise ValueError(f"{flag}: adapter directory not found: {directory}")


@bench_app.command("speed")
def speed(
    prompts: str = typer.Option(..., "--prompts", help="Spec-Bench-format JSONL (question_id, category, turns); first turn only."),
    out: str = typer.Option(..., "--out", help="Directory for speed.json, speed.md, speed.png and speed_runs.jsonl."),
    model: options.Model = DEFAULT_MODEL,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts."),
    per_category: Optional[int] = typer.Option(
        None, "--per-category", help="Use the first N prompts of each Spec-Bench task (a stratified subset)."
    ),
    max_new_tokens: int = typer.Option(SpeedSettings.max_new_tokens, "--max-new-tokens", help="Most new tokens per prompt, every method (Spec-Bench: 1024)."),
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: options.Gamma = DecodeConfig.gamma,
    confidence_threshold: options.ConfidenceThreshold = DecodeConfig.confidence_threshold,
    context_tokens: options.ContextTokens = DecodeConfig.context_tokens,
    context_min_ngram: options.ContextMinNgram = DecodeConfig.context_min_ngram,
    draft_vocab_size: options.DraftVocabSize = DrafterConfig.draft_vocab_size,
    engine: str = typer.Option(SpeedSettings.engine, "--engine", help="Forward of our own methods: fast (packed weights, static cache) or hf."),
    learn: Optional[str] = typer.Option(
        None, "--learn",
        help="Comma-separated schedules (kl-only, kl-rl, rl-only) to learn online first: each starts from the dvi drafter "
        "(the default one, or --adapter), learns on the first half of every category's prompts and is timed as "
        "dvi_<schedule> on the second half.",
    ),
    learn_updates_per_request: int = typer.Option(SpeedSettings.learn_updates_per_request, "--learn-updates-per-request", help="Optimiser steps after each learning request."),
    learn_lr: Optional[float] = typer.Option(
        SpeedSettings.learn_lr, "--learn-lr", help="AdamW lr of every trainable tensor while learning (default: the service's LearnerConfig rates)."),
    learn_batch_tokens: int = typer.Option(SpeedSettings.learn_batch_tokens, "--learn-batch-tokens", help="Scored positions per optimiser step while learning."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Trained adapter directory for the dvi method."),
    variant: Optional[list[str]] = typer.Option(
        None, "--variant", help="NAME=ADAPTER_DIR: one more dvi method with that adapter (repeatable)."
    ),
    methods: Optional[str] = typer.Option(None, "--methods", help=_METHODS_HELP),
    truncate_prompts: options.TruncatePrompts = SpeedSettings.truncate_prompts,
    warmup: int = typer.Option(SpeedSettings.warmup, "--warmup", help="Prompts run through every method before timing (not recorded)."),
    dtype: str = typer.Option(SpeedSettings.dtype, "--dtype", help="float32, float16 or bfloat16."),
    device: str = typer.Option(SpeedSettings.device, "--device", help="Torch device, e.g. cpu or cuda:0."),
    weights: options.Weights = ModelSpec.weights,
    held_out: bool = typer.Option(
        False, "--held-out", help="Time only the held-out half (the prompts `--learn` never trains on), then apply --per-category/--limit. Not with --learn, which splits the prompts itself."
    ),
    threads: options.Threads = None,
) -> None:
    """Time every method on the same prompts (batch 1, greedy, interleaved) and write a report."""
    from dvi.bench import speed as bench

    options.check_threads(threads)
    parsed_methods = parse_methods(methods)
    settings = bench.SpeedSettings(**{
        **options.config_fields(bench.SpeedSettings, locals()), "learn": parse_names("--learn", learn) or (), "variants": parse_variants(variant),
        "methods": parsed_methods if parsed_methods is not None else bench.BUILTIN_METHODS,
    })
    if adapter:
        _check_adapter_dir("--adapter", adapter)
    for name, directory in settings.variants:
        _check_adapter_dir(f"--variant {name}", directory)
    questions = _timed_questions(prompts, held_out, per_category, limit)
    with options.torch_threads(threads):
        _run(settings, questions, out)


def _timed_questions(prompts: str, held_out: bool, per_category: int | None, limit: int | None) -> list:
    """The prompts a speed run times: the held-out half (then per task and limit) or the file's first ones."""
    from common.core.prompts import load_prompts

    if per_category is not None and per_category < 1:
        raise ValueError(f"--per-category must be >= 1, got {per_category}")
    if held_out:
        from dvi.bench.learning import select_per_task, split_train_eval

        return select_per_task(split_train_eval(load_prompts(prompts))[1], per_category, limit)
    return load_prompts(prompts, limit, per_task=per_category)


def _run(settings, questions: list, out: str) -> None:
    """Load the model and drafters, learn online (--learn), encode and check every prompt, time,
    and write the reports."""
    from rich.console import Console

    from common.core.config import ModelSpec
    from common.model.split import SplitModel
    from dvi.bench import speed as bench

    spec = ModelSpec(model=settings.model, dtype=settings.dtype, device=settings.device,
                     drafter=settings.drafter_config(), engine=settings.engine, weights=settings.weights)
    split = SplitModel.load(spec)
    encoded, learning_ids, skipped = _encoded_prompts(settings, split, questions)
    console = Console(stderr=True)
    drafters, learning = _drafters(settings, split, learning_ids, Path(out), console)
    names = list(settings.all_methods)
    n_warm = min(settings.warmup, len(encoded))
    with bench.PassCounter(split.layers[-1]) as counter, bench.quiet_hf_nested_generate():
        table = bench.build_methods(split, settings, counter, drafters)
        with progress_bar(console) as progress:
            task = progress.add_task("warm-up", total=(n_warm + len(encoded)) * len(names), now="")

            def on_step(phase: str, prompt, method: str) -> None:
                progress.update(
                    task, advance=1, description="warm-up" if phase == "warmup" else "timed",
                    now=f"prompt {prompt.index + 1}/{len(encoded)} ({prompt.category}) {method}",
                )

            records = bench.run_benchmark(table, encoded, n_warm, split.device, on_step)
    record, identity = _settings_record(settings, split, encoded, records, drafters, names)
    if settings.learn:
        record["learning"] = {"prompts": len(learning_ids), "split": "per category: the first half learns, "
                              "the second half is timed", "schedules": learning}
    machine = bench.machine_info(str(split.device))
    _, markdown = bench.write_reports(out, settings.model, machine, record, records, identity=identity, skipped=skipped)
    sys.stdout.write(markdown + "\n")
    console.print(f"wrote {Path(out) / 'speed.json'}, speed.md, speed.png, speed_runs.jsonl")


def _encoded_prompts(settings, split, questions: list) -> tuple[list, list, list]:
    """(timed prompts as `BenchPrompt`s, the learning prompts' token ids, skipped requests): with
    --learn, per category the first half learns and the second half is timed."""
    from common.core.prompts import encode_workload
    from common.decoding.speculative import SpeculativeDecoder
    from dvi.bench import speed as bench
    from dvi.bench.learning import split_train_eval

    learning_prompts, timed = split_train_eval(questions) if settings.learn else ([], questions)
    checker = SpeculativeDecoder(split)
    decode = DecodeConfig(gamma=0, max_new_tokens=settings.max_new_tokens)

    def encode(questions: list, what: str) -> tuple[list, list]:
        return encode_workload(questions, split.tokenizer, lambda ids: checker.check_request(ids, decode),
                               max_new_tokens=settings.max_new_tokens, context=split.max_positions,
                               truncate=settings.truncate_prompts, what=what)

    timed_kept, skipped = encode(timed, "timed prompts")
    learning_kept, learning_skipped = encode(learning_prompts, "learning prompts") if learning_prompts else ([], [])
    encoded = [bench.BenchPrompt(i, q.question_id, spec_bench_task(q.category), tuple(ids))
               for i, (q, ids) in enumerate(timed_kept)]
    return encoded, [ids for _, ids in learning_kept], skipped + learning_skipped


def _settings_record(settings, split, encoded: list, records: list, drafters: dict, names: list) -> tuple[dict, dict]:
    """(speed.json's settings block: the flags, each drafter's agreement, the weights and kernels
    used, the identity references; the identity references)."""
    from dvi.bench import speed as bench

    record = bench.settings_record(settings, len(encoded))
    record["agreement"] = bench.drafter_agreement(drafters, encoded, records)
    record["agreement_measure"] = ("top-1 agreement of each drafter's exit head with the verifier at every position "
                                   "of the timed prompts plus hf_ar's output, ungated (common/decoding/agreement.py)")
    identity = bench.identity_references(names, split.weights == "native")
    record.update(
        weights_used=split.weights,
        native_kernels={role: dataclasses.asdict(k) for role, k in (split.native_kernels or {}).items()},
        identity_references=identity,
        identity_references_text="; ".join(f"{m} vs {r}" for m, r in identity.items() if m != r),
    )
    return record, identity


def _drafters(settings, split, learning_ids: list, out: Path, console) -> tuple[dict, dict]:
    """(method name -> SplitModel, schedule -> learning summary). `dvi` is `split` with the default
    drafter (or --adapter), frozen; each dvi_<schedule> is another exit head on the same base
    model that starts from that drafter's weights and learns online on `learning_ids`; each
    variant loads its adapter."""
    from common.model.split import SplitModel
    from dvi.bench import speed as bench
    from dvi.bench.online import learn_online

    def fresh_drafter() -> SplitModel:
        return split.sibling(settings.drafter_config(), settings.engine)

    if settings.adapter:
        split.load_adapter(settings.adapter)
    default_drafter = split.adapter_state()  # what `dvi` times frozen; every learned drafter starts here
    drafters = {"dvi": split} if "dvi" in settings.methods else {}
    learning = {}
    for kind in settings.learn:
        learner_split = fresh_drafter()
        learner_split.load_adapter_state(default_drafter, version=0)
        learner_split.starts_trained = split.starts_trained
        with progress_bar(console) as progress:
            task = progress.add_task(f"learn {kind}", total=len(learning_ids), now="")

            def on_request(result, task=task, progress=progress) -> None:
                progress.update(task, advance=1, now=f"tau {result.tau:.2f}")

            summary = learn_online(learner_split, kind, learning_ids, settings, on_request=on_request)
        learner_split.save_adapter(out / "adapters" / kind)
        learning[kind] = summary.as_dict()
        console.print(f"learned {kind}: {summary.steps} steps on {summary.requests} requests "
                      f"({summary.traffic_tokens} tokens) in {summary.seconds:.0f} s; adapter in {out / 'adapters' / kind}")
        drafters[bench.learned_name(kind)] = learner_split
    for name, directory in settings.variants:
        drafters[name] = fresh_drafter()
        drafters[name].load_adapter(directory)
    return drafters, learning
