"""How fast a warm-start corpus is made: one request at a time by the speculative decoder against
many per verifier pass (`SpeculativeDecoder.generate_batch`).

    python benchmarks/corpus_throughput.py [--prompts N] [--rows 4,8,16] [--max-new-tokens T] [--out DIR]

Takes the first N shipped warm-start seed prompts (`dvi/data/warmstart_seeds.jsonl`, chat
template) and makes their corpus generations the way `dvi warmstart` does (temperature 0.7,
every position recorded with the verifier's top 32, each generation seeded by its index), on
one torch thread: `decoder` decodes them one by one with context drafting (the default,
`--batch-size 1`), `rows=R` decodes R at a time with drafting off. Reports recorded tokens per
second (prompt positions excluded) and each method's time against the decoder's. Writes
corpus_throughput.{json,md} into --out when given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.core.config import ModelSpec  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.speculative import SpeculativeDecoder  # noqa: E402
from common.model.split import SplitModel  # noqa: E402
from dvi.bench.learning import write_table_report  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402
from learner.warmstart import WarmStartConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rows", default="4,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=WarmStartConfig.max_new_tokens)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = SplitModel.load(ModelSpec())
    seeds = load_prompts(ROOT / "dvi/data/warmstart_seeds.jsonl")[: args.prompts]
    prompts = [encode_prompt(split.tokenizer, seed.text) for seed in seeds]
    config = WarmStartConfig(max_new_tokens=args.max_new_tokens)
    decoder = SpeculativeDecoder(split)
    ids = [f"corpus-{i}" for i in range(len(prompts))]

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(len(prompts))]

    def solo() -> list:
        return [decoder.generate(p, config.decode, generator=g, request_id=r) for p, g, r in zip(prompts, generators(), ids)]

    methods = {"decoder": solo}
    for rows in [int(r) for r in args.rows.split(",")]:
        methods[f"rows={rows}"] = (lambda rows=rows: decoder.generate_batch(
            prompts, config.batch_decode, generators=generators(), request_ids=ids, rows=rows))
    decoder.generate(prompts[0], config.decode)  # warm-up: kernels, cost timing
    table = []
    for name, run in methods.items():
        started = time.perf_counter()
        results = run()
        seconds = time.perf_counter() - started
        tokens = sum(len(r.token_ids) for r in results)
        table.append({"method": name, "generations": len(results), "tokens": tokens, "seconds": round(seconds, 2),
                      "tokens_per_s": round(tokens / seconds, 1)})
    base = table[0]["tokens_per_s"]
    lines = [f"# Corpus throughput: {len(prompts)} seed prompts x {args.max_new_tokens} new tokens, temperature "
             f"{config.temperature}", "", f"machine: {machine_line()}", "",
             "| method | generations | tokens | seconds | tokens/s | vs decoder |", "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['method']} | {row['generations']} | {row['tokens']} | {row['seconds']:.1f} | "
                     f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f}x |")
    print("\n".join(lines), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_table_report(args.out, "corpus_throughput", {"machine": machine_line(), "rows": table,
                                                           "settings": vars(args)}, lines)


if __name__ == "__main__":
    main()
