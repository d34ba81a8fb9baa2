"""Agreement of the exit head on text it trained on against text it did not: data or capacity?

    python benchmarks/agreement_gap.py [--adapter DIR] [--self-seeds FILE] [--prompts N]
                                       [--per-task M] [--new-tokens T] [--out DIR]

A drafter that agrees with the verifier as rarely on its own training text as on held-out text is
short of capacity; one that agrees far more often there has memorised its corpus, and wider data
(not a bigger head) is what would raise its held-out agreement. The warm start trains on samples
(temperature 0.7) of its seed prompts, so the greedy continuation of a trained-on seed is close to
text the head saw. Four sets of N prompts, each scored as `dvi warmstart` scores (the model's
greedy continuation, every generated position, ungated, one torch thread):
  * held out: the first N of the held-out half of Spec-Bench dev (the warm start's own score);
  * Spec-Bench, other half: never trained on either, the same tasks;
  * shipped seeds, trained on: the first N of dvi/data/warmstart_seeds.jsonl, interleaved;
  * self-written seeds, trained on: the first N of --self-seeds (the shipped warm start's).
With --per-task M, one more set per Spec-Bench task: its first M prompts of the whole dev file
(neither half is trained on), to show which kinds of text the head has not learnt.
Prints and writes agreement_gap.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.agreement import agreement, greedy_targets  # noqa: E402
from dvi.bench.drafter_probe import add_drafter_args, load_drafter, texts_by_category  # noqa: E402
from dvi.bench.learning import interleave_categories, split_train_eval, write_table_report  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402
from dvi.commands.warmstart import SEEDS  # noqa: E402
from dvi.data import SPEC_BENCH_DEV  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drafter_args(parser)
    parser.add_argument("--self-seeds", default=str(ROOT / "docs/warmstart/self_seeds.jsonl"),
                        help="The self-written seeds the adapter trained on ({\"prompt\"} lines).")
    parser.add_argument("--prompts", type=int, default=24, help="Prompts per set.")
    parser.add_argument("--per-task", type=int, default=0, help="Also score the first M dev prompts of every task (0: off).")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/agreement_gap")
    args = parser.parse_args()
    split = load_drafter(args)
    other_half, held = split_train_eval(load_prompts(SPEC_BENCH_DEV))
    n = args.prompts
    sets = {
        "held out (Spec-Bench dev, held-out half)": [p.text for p in held[:n]],
        "Spec-Bench dev, other half (not trained on)": [p.text for p in other_half[:n]],
        "shipped seeds (trained on)": [p.text for p in interleave_categories(load_prompts(SEEDS))[:n]],
        "self-written seeds (trained on)": [p.text for p in load_prompts(args.self_seeds)[:n]],
    }
    if args.per_task > 0:
        by_task = texts_by_category(other_half + held, args.per_task)
        sets |= {f"Spec-Bench {task} (not trained on)": texts for task, texts in by_task.items()}
    rows = {}
    for name, texts in sets.items():
        prompts = [encode_prompt(split.tokenizer, t) for t in texts]
        scored = agreement(split, greedy_targets(split, prompts, args.new_tokens))
        rows[name] = {"prompts": len(texts), "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts),
                      "positions": scored.positions, "agreed": scored.agreed, "agreement": scored.rate}
        print(f"{name}: {100 * scored.rate:.1f}% of {scored.positions}", flush=True)
    record = {"model": args.model, "exit_layer": args.exit_layer, "adapter": args.adapter or "default drafter",
              "new_tokens": args.new_tokens, "sets": rows, "machine": machine_line()}
    lines = [f"# Agreement on trained-on and held-out text ({args.model}, exit layer {args.exit_layer}, {record['adapter']})", "",
             f"{n} prompts per set ({args.per_task} per task), {args.new_tokens} greedy tokens each; machine: {record['machine']}", "",
             "| prompts | count | mean prompt tokens | positions | agreement |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {row['prompts']} | {row['mean_prompt_tokens']:.0f} | {row['positions']} | {100 * row['agreement']:.1f}% |"
              for name, row in rows.items()]
    print(write_table_report(args.out, "agreement_gap", record, lines), end="")


if __name__ == "__main__":
    main()
