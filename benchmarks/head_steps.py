"""Where the exit head's draft steps go: steps run against tokens drafted, with and without the head.

    python benchmarks/head_steps.py [--per-category N] [--max-new-tokens T] [--repeats R]

Decodes the first N held-out Spec-Bench prompts of every task (the half `dvi bench speed --learn`
times) with the default drafter, twice per prompt: context drafting only (gamma 0) and the full
decoder, greedy, one torch thread, interleaved per prompt. For each it counts the exit head's draft
steps (`SplitModel.draft` calls: drafted tokens, steps that stopped under the confidence
threshold, and the arbitration's probes of the head's confidence that the context then won) and
their seconds, next to the wall time, verifier passes and the tokens the head drafted and got
accepted. A step the head runs and throws away costs the exit head's work (a probe) or a whole
draft step: this shows how many there are. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DecodeConfig, ModelSpec  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.speculative import SpeculativeDecoder  # noqa: E402
from common.model.split import SplitModel  # noqa: E402
from dvi.bench.learning import select_per_task, split_train_eval  # noqa: E402
from dvi.bench.speed import machine_info  # noqa: E402

FIELDS = ("seconds", "tokens", "verifier passes", "head drafted", "head accepted", "head steps", "head step seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "dvi/data/spec_bench/question_dev.jsonl"))
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = SplitModel.load(ModelSpec())
    questions = select_per_task(split_train_eval(load_prompts(args.prompts))[1], args.per_category, None)
    costs = split.costs(0)  # timed once now, so its own draft steps are not counted below
    steps = {"calls": 0, "seconds": 0.0}
    draft = split.draft

    def counted(*a, **k):
        started = time.perf_counter()
        try:
            return draft(*a, **k)
        finally:
            steps["seconds"] += time.perf_counter() - started
            steps["calls"] += 1

    split.draft = counted
    decoder = SpeculativeDecoder(split)
    methods = {"dvi_context": DecodeConfig(gamma=0, max_new_tokens=args.max_new_tokens),
               "dvi": DecodeConfig(max_new_tokens=args.max_new_tokens)}
    totals = {name: dict.fromkeys(FIELDS, 0) for name in methods}
    for _ in range(args.repeats):
        for q in questions:
            ids = encode_prompt(split.tokenizer, q.text)
            for name, config in methods.items():
                steps.update(calls=0, seconds=0.0)
                started = time.perf_counter()
                result = decoder.generate(ids, config)
                row = totals[name]
                row["seconds"] += time.perf_counter() - started
                row["tokens"] += len(result.token_ids)
                row["verifier passes"] += result.verifier_passes
                row["head drafted"] += result.drafted
                row["head accepted"] += result.accepted
                row["head steps"] += steps["calls"]
                row["head step seconds"] += steps["seconds"]
    info = machine_info("cpu")
    print(f"{len(questions)} held-out prompts x {args.repeats}, {args.max_new_tokens} new tokens, greedy, 1 thread; "
          f"{info['processor']}; draft step {costs[0]:.3f}, verify row {costs[1]:.3f}, probe {costs[2]:.3f} of a one-row pass")
    print("| method | " + " | ".join(FIELDS) + " |")
    print("|---|" + "---:|" * len(FIELDS))
    for name, row in totals.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
