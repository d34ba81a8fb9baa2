"""`dvi bench ablation`: every speed lever of dvi switched off in turn, timed side by side."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig
from common.core.prompts import skipped_summary, spec_bench_task
from dvi import options
from dvi.app import bench_app
from dvi.progress import progress_bar


@bench_app.command("ablation")
def ablation(
    prompts: str = typer.Option(..., "--prompts", help="Spec-Bench-format JSONL (first turn only)."),
    adapter: str = typer.Option(..., "--adapter", help="A trained adapter (e.g. a `dvi bench speed --learn` run's adapters/kl-rl)."),
    out: str = typer.Option(..., "--out", help="Directory for ablation.json and ablation.md."),
    model: options.Model = DEFAULT_MODEL,
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N prompts."),
    per_category: Optional[int] = typer.Option(None, "--per-category", help="Use the first N prompts of each Spec-Bench task."),
    held_out: bool = typer.Option(
        False, "--held-out", help="Time only the held-out half (the prompts `dvi bench speed --learn` times, not those it learns on)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most new tokens per prompt."),
    gamma: options.Gamma = DecodeConfig.gamma,
    confidence_threshold: options.ConfidenceThreshold = DecodeConfig.confidence_threshold,
    context_tokens: options.ContextTokens = DecodeConfig.context_tokens,
    context_min_ngram: options.ContextMinNgram = DecodeConfig.context_min_ngram,
    adaptive_gamma: options.AdaptiveGamma = DecodeConfig.adaptive_gamma,
    levers: Optional[str] = typer.Option(None, "--levers", help="Comma-separated levers to switch off (default: all)."),
    warmup: int = typer.Option(2, "--warmup", help="Prompts run through every variant before timing."),
    threads: options.Threads = None,
) -> None:
    """Time dvi with all levers on, then with each one off, next to hf_ar and our plain AR."""
    from dvi.bench import ablation as bench
    from dvi.commands.bench_speed import parse_names

    decode = DecodeConfig(gamma=gamma, max_new_tokens=max_new_tokens, confidence_threshold=confidence_threshold,
                          context_tokens=context_tokens, context_min_ngram=context_min_ngram, adaptive_gamma=adaptive_gamma)
    chosen = parse_names("--levers", levers) or tuple(bench.LEVERS)
    options.check_threads(threads)
    if not Path(adapter).is_dir():
        raise ValueError(f"--adapter: adapter directory not found: {adapter}")
    with options.torch_threads(threads):
        _run(model, prompts, adapter, Path(out), decode, chosen, limit, per_category, held_out, warmup)


def _run(model_id, prompts_path, adapter, out: Path, decode, levers, limit, per_category, held_out, warmup) -> None:
    from rich.console import Console

    from common.core.config import ModelSpec
    from common.model.split import SplitModel, read_adapter_dir
    from dvi.bench import ablation as bench
    from dvi.bench import speed

    meta, tensors = read_adapter_dir(adapter)
    drafter = bench.drafter_config_of(meta)
    base = SplitModel.load(ModelSpec(model=model_id, drafter=drafter))
    base.check_adapter_meta(meta, adapter)
    split_for = _variant_splits(base, drafter, meta, tensors)
    encoded, skipped = _encoded_prompts(base, prompts_path, decode, held_out, per_category, limit)
    settings = speed.SpeedSettings(prompts=prompts_path, model=model_id, max_new_tokens=decode.max_new_tokens,
                                   exit_layer=drafter.exit_layer, methods=("hf_ar", "ar"))
    console = Console(stderr=True)
    with speed.PassCounter(base.layers[-1]) as counter, speed.quiet_hf_nested_generate():
        table = speed.build_methods(base, settings, counter, {})
        for v in bench.variants(decode, drafter.draft_vocab_size, levers):
            table[v.name] = speed.DecoderMethod(split_for(v), v.decode)
        with progress_bar(console) as progress:
            warm = min(warmup, len(encoded))
            task = progress.add_task("ablation", total=(warm + len(encoded)) * len(table), now="")
            records = speed.run_benchmark(
                table, encoded, warm, base.device,
                lambda phase, prompt, method: progress.update(task, advance=1, now=f"{phase} {prompt.index + 1} {method}"),
            )
    rows = speed.aggregate(records)
    markdown = bench.markdown_table(rows)
    payload = {
        "model": model_id,
        "machine": speed.machine_info(str(base.device)),
        "settings": {"prompts": prompts_path, "prompts_used": len(encoded), "adapter": adapter,
                     "max_new_tokens": decode.max_new_tokens, "decode": decode.__dict__, "drafter": drafter.__dict__,
                     "levers": {lever: bench.LEVERS[lever] for lever in levers},
                     "command": "dvi " + " ".join(shlex.quote(a) for a in sys.argv[1:])},
        **skipped_summary(skipped),
        "runs": speed.with_renamed_fields(rows),
    }
    bench.write_reports(out, payload, markdown)
    sys.stdout.write(markdown + "\n")
    console.print(f"wrote {out / 'ablation.json'}, ablation.md")


def _variant_splits(base, drafter, meta: dict, tensors: dict):
    """split_for(variant): the drafter a variant decodes with, built once per (engine, trained,
    draft vocabulary) on `base`'s frozen model; trained ones carry the adapter's tensors."""
    from common.model.split import DRAFT_VOCAB_KEY

    splits: dict[tuple, object] = {}

    def split_for(v):
        key = (v.engine, v.trained, v.draft_vocab_size)
        if key not in splits:
            s = base.sibling(dataclasses.replace(drafter, draft_vocab_size=v.draft_vocab_size), v.engine)
            if v.trained:
                state = dict(tensors)
                if not v.draft_vocab_size:
                    state.pop(DRAFT_VOCAB_KEY, None)  # the same LoRA, every row of the LM head
                s.load_adapter_state(state, int(meta.get("weight_version", 0)))
            splits[key] = s
        return splits[key]

    return split_for


def _encoded_prompts(base, prompts_path, decode, held_out: bool, per_category, limit):
    """(the timed prompts as `BenchPrompt`s, the skipped requests) of the workload."""
    from common.core.prompts import encode_workload, load_prompts
    from common.decoding.speculative import SpeculativeDecoder
    from dvi.bench import speed
    from dvi.bench.learning import select_per_task, split_train_eval

    questions = load_prompts(prompts_path)
    if held_out:
        questions = split_train_eval(questions)[1]
    questions = select_per_task(questions, per_category, limit)
    checker = SpeculativeDecoder(base)
    kept, skipped = encode_workload(questions, base.tokenizer, lambda ids: checker.check_request(ids, decode),
                                    max_new_tokens=decode.max_new_tokens, context=base.max_positions)
    return [speed.BenchPrompt(i, q.question_id, spec_bench_task(q.category), tuple(ids))
            for i, (q, ids) in enumerate(kept)], skipped
