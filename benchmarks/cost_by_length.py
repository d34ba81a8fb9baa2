"""Costs priced by the sequence's length against costs timed at one short context: tokens/s per task.

    python benchmarks/cost_by_length.py [--per-category N] [--max-new-tokens T] [--out DIR]

On native weights a verify row's cost grows with the context (its attention does; on an AMD EPYC
0.095 of a one-row pass at 64 tokens, 0.197 at 1,024), and the adaptive draft lengths and the
arbitration decide by it. `SplitModel.costs(length)` interpolates timings at a short and a long
context; the previous rule used the short context's costs for every block. This decodes the first
N held-out Spec-Bench prompts of every task (the half `dvi bench speed --learn` times) with the
default drafter under both, for context drafting alone (gamma 0) and the full decoder, greedy, one
torch thread, the four methods interleaved per prompt in a rotating order. Every method must give
the same tokens (greedy decoding is the model's own output whatever is drafted). Prints a markdown
table of tokens/s per task and overall and, with --out, writes it and the raw rows there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DecodeConfig, ModelSpec  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts, spec_bench_task  # noqa: E402
from common.decoding.speculative import SpeculativeDecoder  # noqa: E402
from common.model.split import SplitModel  # noqa: E402
from dvi.bench.learning import select_per_task, split_train_eval  # noqa: E402
from dvi.bench.speed import machine_info, method_order  # noqa: E402

METHODS = {  # name: (gamma 0 = context drafting only, costs by length)
    "dvi_context": (True, True),
    "dvi_context (costs at 64 tokens)": (True, False),
    "dvi": (False, True),
    "dvi (costs at 64 tokens)": (False, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "dvi/data/spec_bench/question_dev.jsonl"))
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = SplitModel.load(ModelSpec())
    questions = select_per_task(split_train_eval(load_prompts(args.prompts))[1], args.per_category, None)
    by_length = split.costs  # timed now, before any method runs
    timed = {length: by_length(length) for length in split.COST_CONTEXTS}
    short = by_length(0)
    decoder = SpeculativeDecoder(split)
    rows = []
    for index, q in enumerate(questions):
        ids = encode_prompt(split.tokenizer, q.text)
        outputs = {}
        for name in method_order(list(METHODS), index):
            context_only, priced_by_length = METHODS[name]
            split.costs = by_length if priced_by_length else (lambda length: short)
            config = DecodeConfig(gamma=0 if context_only else DecodeConfig.gamma, max_new_tokens=args.max_new_tokens)
            started = time.perf_counter()
            result = decoder.generate(ids, config)
            seconds = time.perf_counter() - started
            outputs[name] = result.token_ids
            rows.append({"task": spec_bench_task(q.category), "prompt_tokens": len(ids), "method": name, "seconds": seconds,
                         "tokens": len(result.token_ids), "verifier_passes": result.verifier_passes})
        if len({tuple(t) for t in outputs.values()}) != 1:
            raise SystemExit(f"prompt {index}: the methods' tokens differ (greedy decoding must not depend on the draft)")
    del split.costs
    info = machine_info("cpu")
    tasks = sorted({r["task"] for r in rows})

    def rate(method: str, task: str | None = None) -> float:
        picked = [r for r in rows if r["method"] == method and (task is None or r["task"] == task)]
        return sum(r["tokens"] for r in picked) / sum(r["seconds"] for r in picked)

    lines = [f"{len(questions)} held-out prompts, {args.max_new_tokens} new tokens, greedy, 1 thread, interleaved; "
             f"{info['processor']}; costs (draft step, verify row) timed: "
             + ", ".join(f"{length} tokens {d:.3f}, {r:.3f}" for length, (d, r) in timed.items()), "",
             "| task | mean prompt tokens | " + " | ".join(METHODS) + " | dvi by length / at 64 |",
             "|---|---:|" + "---:|" * (len(METHODS) + 1)]
    for task in tasks + [None]:
        picked = [r for r in rows if r["method"] == "dvi" and (task is None or r["task"] == task)]
        mean_prompt = sum(r["prompt_tokens"] for r in picked) / len(picked)
        rates = [rate(m, task) for m in METHODS]
        lines.append(f"| {task or 'all'} | {mean_prompt:.0f} | " + " | ".join(f"{v:.1f}" for v in rates)
                     + f" | {rate('dvi', task) / rate('dvi (costs at 64 tokens)', task):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cost_by_length.md").write_text(f"`python benchmarks/cost_by_length.py --per-category {args.per_category} "
                                               f"--max-new-tokens {args.max_new_tokens}`\n\n{table}\n")
        (out / "cost_by_length.json").write_text(json.dumps({"machine": info, "timed_costs": timed, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
