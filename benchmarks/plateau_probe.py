"""What holds the exit head's agreement at its plateau: its capacity, or the text it learns from?

    python benchmarks/plateau_probe.py [--seeds N] [--in-distribution M] [--per-task P] [--samples S]
        [--variants one,two,spec_bench_half,same_prompts,own_prompts,sharp,hard] [--steps N]
        [--lr LR] [--points K] [--save-adapters] [--out DIR]

The shipped warm start's curve flattens at about 36% held-out agreement from 600k corpus tokens
on. Three fine-tunings of the default drafter, from the same start, at the same steps and rates
(WarmStartConfig's learner, every shared tensor at `--lr`: the learner's fine-tuning rate unless
given; cosine decay), tell the explanations apart:
  one: on a fresh corpus: the model writes N new seed instructions (learner/self_seeds.py with
       another seed than the warm start's; none of the shipped 4,800), sampled as the warm start
       samples (WarmStartConfig); the first M are never trained on;
  two: on the same corpus, with a second trainable decoder layer after the exit layer: a copy of
       the model's layer k + 1 with its attention output and MLP down projections zeroed (LLaMA
       Pro's block expansion: it starts as the identity, so `two` starts where `one` does), at
       `--new-layer-lr`; every shared tensor trains as in `one`;
  spec_bench_half: a diagnostic, never shipped: the other half of the Spec-Bench dev prompts,
       each sampled S times like the warm start's seeds; what text of the evaluation's own tasks
       (other prompts of them) would do, the distribution the self-written seeds lack;
  same_prompts: a bound, never shipped: the scored held-out prompts themselves, each sampled S
       times (their greedy continuations, which are scored, lie close to these samples). No traffic
       can be nearer the evaluation than this: what the head agrees here is about the most any
       amount of in-domain text could teach it at this exit layer and budget;
  own_prompts: the same bound's prompt half only: the scored prompts' own prompt positions (the
       verifier's distribution at every position whose next token is in the prompt, once per
       prompt), nothing they generated. What a head could learn from a request before decoding it
       (test-time training on its prompt); `same_prompts` minus this is what the answers teach;
  sharp, hard: the objective, not the text: `one`'s corpus and steps with the teacher sharpened,
       its top-K log-probs renormalised at `--teacher-temperature` (sharp) or made one-hot on its
       top-1 (hard: cross-entropy on the verifier's greedy token), the drafter still at T = 1.
       Greedy acceptance asks only for the verifier's top-1; a head of little capacity that
       spends less of it matching the verifier's tail may agree more often.
Every one is scored before and after on the held-out half of the dev prompts (the first P of each
category, per task too), never trained on by any, and on the M fresh seeds' text (held out, "in
distribution": text like the corpus's, not in it; only when a variant trains on the fresh corpus or
`--steps` is not given, since the fresh corpus sets the steps). A head short of capacity gains more with the
second layer; one short of the right text agrees far better in distribution than on Spec-Bench
and gains most from the diagnostic. The second layer is a training-view probe (no fast-engine
drafting path): with it a draft step would cost one more layer, about 1/30 of a forward.
Prints and writes plateau_probe.{json,md}. One torch thread; `--workers` processes generate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.core.config import DrafterConfig, ModelSpec  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.core.types import DRAFTED_FIELDS, VERIFIED_FIELDS, Trajectory  # noqa: E402
from common.decoding.agreement import agreement, greedy_targets  # noqa: E402
from common.model.split import call_layer  # noqa: E402
from dvi.bench.drafter_probe import add_drafter_args, load_drafter, prompts_by_category, texts_by_category  # noqa: E402
from dvi.bench.learning import split_train_eval, write_table_report  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402
from dvi.data import SPEC_BENCH_DEV  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.self_seeds import self_instruct_prompts  # noqa: E402
from learner.warmstart import WarmStartConfig, generate_corpus, lr_schedule  # noqa: E402


FRESH_CORPUS_VARIANTS = frozenset({"one", "two", "sharp", "hard"})
"""Variants trained on the fresh self-written corpus (which also sets the default steps)."""
OWN_CORPUS_VARIANTS = frozenset({"spec_bench_half", "same_prompts", "own_prompts"})
"""Variants trained on a corpus of their own name."""


class TwoExitLayers(nn.Module):
    """Two decoder layers run in turn with one decoder layer's call (training view: no cache)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, hidden, attention_mask=None, position_ids=None, use_cache=False, position_embeddings=None,
                past_key_values=None, **_):
        if past_key_values is not None:
            raise ValueError("the two-layer exit head is a training-view probe: it keeps no cache")
        for layer in (self.first, self.second):
            hidden = call_layer(layer, hidden, position_embeddings, attention_mask, position_ids)
        return hidden


def add_second_layer(split) -> list[nn.Parameter]:
    """Put a zero-output copy of decoder layer k + 1 after the exit head's trainable layer; returns
    its parameters (trainable). The head's outputs are unchanged until they train."""
    wrapper = split._head.block
    name = wrapper.active_adapters[0]
    second = copy.deepcopy(split.layers[split.exit_layer + 1])
    second.self_attn.layer_idx = 1
    with torch.no_grad():
        second.self_attn.o_proj.weight.zero_()
        second.mlp.down_proj.weight.zero_()
    for p in second.parameters():
        p.requires_grad_(True)
    wrapper.modules_to_save[name] = TwoExitLayers(wrapper.modules_to_save[name], second)
    return list(second.parameters())


def remove_second_layer(split) -> None:
    """Undo `add_second_layer` (the exit layer keeps what it learned)."""
    wrapper = split._head.block
    name = wrapper.active_adapters[0]
    wrapper.modules_to_save[name] = wrapper.modules_to_save[name].first


def sharpen_teacher(trajectory, temperature: float):
    """A copy of `trajectory` whose verifier top-K log-probs (drafted and verified positions) are
    log_softmax(logprobs / temperature) over the K ids; temperature 0 puts all mass on each row's
    top-1 (log-prob 0 there, -inf elsewhere: the KL then is the cross-entropy on that token)."""
    if temperature < 0:
        raise ValueError(f"teacher temperature must be >= 0, got {temperature}")

    def sharp(logprobs: torch.Tensor) -> torch.Tensor:
        if logprobs.numel() == 0:
            return logprobs
        if temperature == 0:
            top = logprobs.argmax(-1, keepdim=True)
            return torch.full_like(logprobs, -math.inf).scatter_(-1, top, 0.0)
        return torch.log_softmax(logprobs / temperature, dim=-1)

    return replace(trajectory, verifier_topk_logprobs=sharp(trajectory.verifier_topk_logprobs),
                   verified_topk_logprobs=sharp(trajectory.verified_topk_logprobs))


def prompt_positions_only(trajectory: Trajectory) -> Trajectory:
    """`trajectory` cut to its prompt: no drafted rows, the verified positions whose next token is
    in the prompt (p < P - 1), and the states and tokens up to the prompt's end."""
    P = trajectory.prompt_length
    keep = trajectory.verified_position < P - 1
    empty = {name: getattr(trajectory, name)[:0] for name in DRAFTED_FIELDS}
    return replace(trajectory, **empty, hidden=trajectory.hidden[:P], tokens=trajectory.tokens[:P + 1],
                   **{name: getattr(trajectory, name)[keep] for name in VERIFIED_FIELDS}).validate()


def write_scored_prompts(path: Path, held_half: list, per_category: int) -> None:
    """The scored prompts (`prompts_by_category` of the held-out half, as `texts_by_category` takes
    them) as a Spec-Bench-format file, in file order: the prompt set of a `dvi bench speed` run that
    times the variants' saved drafters where they were scored."""
    chosen = {id(p) for group in prompts_by_category(held_half, per_category).values() for p in group}
    rows = [{"question_id": p.question_id, "category": p.category, "turns": [p.text]} for p in held_half if id(p) in chosen]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def fine_tune(split, corpus, steps: int, lr: float, lr_of_new: float, new_params: list[nn.Parameter], score,
              points: int) -> list[dict]:
    """`steps` learner steps (WarmStartConfig's learner, cosine decay from `lr`) over the whole
    corpus, `new_params` in a group of their own at `lr_of_new`; score() at `points` even stages."""
    config = WarmStartConfig()
    total = sum(t.num_scored for t in corpus)
    learner = Learner(split, replace(config.learner, replay_capacity_tokens=total, seed=config.seed, fine_tune_lr=lr),
                      learner_id="plateau-probe")
    if new_params:
        new = {id(p) for p in new_params}
        group = dict(learner.optimizer.param_groups[0])
        for g in learner.optimizer.param_groups:
            g["params"] = [p for p in g["params"] if id(p) not in new]
        learner.optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": new_params, "lr": lr_of_new, "initial_lr": lr_of_new})
    schedule = lr_schedule(learner.optimizer, "cosine", steps)
    learner.add(corpus)
    started = time.perf_counter()
    curve = [{"steps": 0, "seconds": 0.0, **score()}]
    marks = {round(steps * (i + 1) / points) for i in range(points)}
    for step in range(1, steps + 1):
        learner.train_step()
        schedule.step()
        if step in marks:
            curve.append({"steps": step, "seconds": time.perf_counter() - started, **score()})
            fresh = curve[-1].get("in_distribution")
            print(f"  step {step}/{steps}: Spec-Bench {100 * curve[-1]['spec_bench']:.1f}%"
                  + ("" if fresh is None else f", in distribution {100 * fresh:.1f}%"), flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drafter_args(parser)
    parser.add_argument("--seeds", type=int, default=600, help="Fresh self-written seed instructions.")
    parser.add_argument("--seed", type=int, default=1, help="Their seed (the warm start's is 0).")
    parser.add_argument("--in-distribution", type=int, default=64, help="Fresh seeds scored, never trained on.")
    parser.add_argument("--per-task", type=int, default=8, help="Held-out dev prompts scored per category.")
    parser.add_argument("--samples", type=int, default=4,
                        help="Samples of each dev prompt a diagnostic trains on (spec_bench_half, same_prompts).")
    parser.add_argument("--epochs", type=float, default=WarmStartConfig.epochs, help="Over the fresh corpus; every variant takes those steps.")
    parser.add_argument("--steps", type=int, default=None,
                        help="Steps of every variant (default: --epochs of the fresh corpus).")
    parser.add_argument("--lr", type=float, default=LearnerConfig.fine_tune_lr, help="Rate of every shared tensor.")
    parser.add_argument("--new-layer-lr", type=float, default=1e-3)
    parser.add_argument("--teacher-temperature", type=float, default=0.5, help="The sharp variant's teacher temperature.")
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--variants", default="one,two,spec_bench_half")
    parser.add_argument("--save-adapters", action="store_true",
                        help="Save each variant's final drafter under OUT/adapters/VARIANT (for `dvi bench speed --variant`).")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", default="benchmarks/results/plateau_probe/cache")
    parser.add_argument("--out", default="benchmarks/results/plateau_probe")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - FRESH_CORPUS_VARIANTS - OWN_CORPUS_VARIANTS
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}")
    split = load_drafter(args)
    tok = split.tokenizer
    spec = ModelSpec(model=args.model, drafter=DrafterConfig(exit_layer=args.exit_layer))
    config = WarmStartConfig()
    started = time.perf_counter()

    def corpus_of(texts: list[str], cfg: WarmStartConfig, name: str) -> list:
        corpus, _ = generate_corpus(split, [encode_prompt(tok, t) for t in texts], cfg, directory=Path(args.cache) / "corpus",
                                    workers=args.workers, spec=spec,
                                    on_request=lambda d, n: print(f"{name}: generation {d}/{n}", end="\r", flush=True))
        print(f"{name}: {len(corpus)} generations, {sum(t.num_scored for t in corpus)} positions "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return corpus

    corpora, written, fresh, held_seeds, trained_seeds = {}, [], [], [], []
    if args.steps is None or set(variants) & FRESH_CORPUS_VARIANTS:
        shipped = {p.text for p in load_prompts(ROOT / "docs/warmstart/self_seeds.jsonl")}
        written = self_instruct_prompts(split, args.seeds, seed=args.seed, rows=config.batch_size, workers=args.workers,
                                        spec=spec, cache_dir=Path(args.cache) / "seeds")
        fresh = [s for s in written if s not in shipped]
        held_seeds, trained_seeds = fresh[: args.in_distribution], fresh[args.in_distribution:]
        corpora["fresh"] = corpus_of(trained_seeds, config, "fresh seeds")
    other_half, held_half = split_train_eval(load_prompts(SPEC_BENCH_DEV))
    by_task = texts_by_category(held_half, args.per_task)
    sampled = replace(config, samples_per_prompt=args.samples)
    if "spec_bench_half" in variants:
        corpora["spec_bench_half"] = corpus_of([p.text for p in other_half], sampled, "other half")
    if {"same_prompts", "own_prompts"} & set(variants):
        corpora["same_prompts"] = corpus_of([x for texts in by_task.values() for x in texts], sampled, "scored prompts")
    if "own_prompts" in variants:
        corpora["own_prompts"] = [prompt_positions_only(t) for t in corpora["same_prompts"][::args.samples]]
    generated = time.perf_counter() - started

    sets = {task: greedy_targets(split, [encode_prompt(tok, x) for x in texts], 64) for task, texts in by_task.items()}
    if held_seeds:
        sets["in_distribution"] = greedy_targets(split, [encode_prompt(tok, s) for s in held_seeds], 64)
    counts = {name: sum(t.num_scored for t in ts) for name, ts in sets.items()}
    tasks = list(by_task)

    def score() -> dict[str, float]:
        rates = {name: agreement(split, ts) for name, ts in sets.items()}
        pooled = sum(rates[t].agreed for t in tasks) / sum(rates[t].positions for t in tasks)
        fresh_rate = {"in_distribution": rates["in_distribution"].rate} if held_seeds else {}
        return {"spec_bench": pooled, **fresh_rate, "per_task": {t: rates[t].rate for t in tasks}}

    steps = args.steps or max(1, math.ceil(args.epochs * sum(t.num_scored for t in corpora["fresh"]) / config.learner.batch_tokens))
    start_state = split.adapter_state()
    curves = {}
    for variant in variants:
        split.load_adapter_state(start_state, split.weight_version)
        new_params = add_second_layer(split) if variant == "two" else []
        print(f"{variant}: {steps} steps", flush=True)
        corpus = corpora[variant if variant in OWN_CORPUS_VARIANTS else "fresh"]
        if variant in ("sharp", "hard"):
            corpus = [sharpen_teacher(t, args.teacher_temperature if variant == "sharp" else 0.0) for t in corpus]
        curves[variant] = fine_tune(split, corpus, steps, args.lr, args.new_layer_lr, new_params, score, args.points)
        if new_params:
            remove_second_layer(split)
        if args.save_adapters and not new_params:
            split.save_adapter(Path(args.out) / "adapters" / variant)
    write_scored_prompts(Path(args.out) / "scored_prompts.jsonl", held_half, args.per_task)

    record = {"model": args.model, "exit_layer": args.exit_layer, "adapter": args.adapter or "default drafter",
              "seeds_written": len(written), "fresh_seeds": len(fresh), "in_distribution_seeds": len(held_seeds),
              "corpora": {name: {"generations": len(c), "positions": sum(t.num_scored for t in c)} for name, c in corpora.items()},
              "spec_bench_half_samples": args.samples, "epochs_of_fresh": args.epochs, "steps": steps,
              "lr": args.lr, "new_layer_lr": args.new_layer_lr, "teacher_temperature": args.teacher_temperature, "scored_positions": counts, "curves": curves,
              "seconds": time.perf_counter() - started, "generation_seconds": generated, "machine": machine_line()}
    if "fresh" in corpora:
        info = record["corpora"]["fresh"]
        budget = (f"{args.epochs} epochs of the fresh corpus: {info['generations']} generations of {len(trained_seeds)} "
                  f"fresh self-written seeds, {info['positions']} positions")
        fresh_scored = f", and {len(held_seeds)} fresh seeds never trained on ({counts['in_distribution']} positions)"
    else:
        budget, fresh_scored = "--steps", ""
    lines = [f"# What holds the exit head's plateau ({args.model}, exit layer {args.exit_layer}, from the {record['adapter']})", "",
             f"Every variant: {steps} steps from the same start ({budget}), cosine from "
             f"{args.lr}; the second layer at {args.new_layer_lr}; the sharp teacher at T = {args.teacher_temperature}. Scored: the held-out half of the Spec-Bench dev prompts, "
             f"first {args.per_task} of each category ({sum(counts[t] for t in tasks)} positions){fresh_scored}; "
             f"64 greedy tokens each. Machine: {record['machine']}", ""]
    described = {"spec_bench_half": f"a diagnostic, never shipped: {len(other_half)} other-half dev prompts",
                 "same_prompts": f"a bound, never shipped: the {sum(map(len, by_task.values()))} scored prompts themselves",
                 "own_prompts": "the scored prompts' prompt positions only, once each"}
    for name, what in described.items():
        if name in corpora:
            info = record["corpora"][name]
            sampled_text = "" if name == "own_prompts" else f" x {args.samples} samples"
            lines += [f"{name} ({what}){sampled_text}, {info['generations']} trajectories, "
                      f"{info['positions']} positions.", ""]
    lines += ["| variant | steps | Spec-Bench held-out half | in distribution |", "|---|---:|---:|---:|"]
    for name, curve in curves.items():
        lines += [f"| {name} | {p['steps']} | {100 * p['spec_bench']:.1f}% | "
                  + ("-" if "in_distribution" not in p else f"{100 * p['in_distribution']:.1f}%") + " |" for p in curve]
    lines += ["", "Per task, before -> after each variant:", "",
              "| task | positions | before | " + " | ".join(curves) + " |", "|---|---:|---:|" + "---:|" * len(curves)]
    first = next(iter(curves.values()))[0]["per_task"]
    lines += [f"| {t} | {counts[t]} | {100 * first[t]:.1f}% | " + " | ".join(f"{100 * c[-1]['per_task'][t]:.1f}%" for c in curves.values()) + " |"
              for t in tasks]
    print(write_table_report(args.out, "plateau_probe", record, lines), end="")


if __name__ == "__main__":
    main()
