"""How much does traffic drafting pay once a decoder has served some traffic? The product's
`DecodeConfig.traffic_drafting` (common/core/traffic_draft.py), off against on.

    python benchmarks/traffic_index_probe.py [--per-category N] [--max-new-tokens T] [--out DIR]

Context drafting (`common/core/context_draft.py`) looks at the request's own tokens. With traffic
drafting a decoder also keeps a `TrafficIndex`: the next-token counts of every 2-4-gram of the
requests it served, bounded in memory. Where the request's own context matches only its last
token (or nothing), a greedy block drafts the index's most frequent continuation instead, token by
token while that continuation holds at least half of its n-gram's count and was seen twice. It
is a drafter that learns from traffic with no gradient step, priced and arbitrated as a context
draft (its acceptance kept apart, under negative n-gram lengths).

Protocol, as `dvi bench speed --learn` splits the dev prompts: the index first learns from
serving the training half of every Spec-Bench category (every prompt, untimed, greedy, its
prompt and output added); then the first N held-out prompts of every task are timed with four
methods interleaved per prompt in rotating order, each decoding with one torch thread: context
drafting only and the full decoder, each with traffic drafting off and on. The index keeps learning
from the held-out prompts as they are served (each method's own copy, after its own request), as
a service would. Every method must decode the tokens of the first (checked). Prints and writes
traffic_index_probe.{json,md}.

History: on 2026-12-07 (the fourth session, Intel Xeon) this script carried its own index (exact
counts, unbounded, the same drafting rule) and measured +1.5% / +1.1%; it was then kept in the
product, bounded (the fifth session), and the script now measures the product's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DecodeConfig, ModelSpec  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.core.traffic_draft import TrafficIndex  # noqa: E402
from common.decoding.speculative import SpeculativeDecoder  # noqa: E402
from common.model.split import SplitModel  # noqa: E402
from dvi.bench.learning import select_per_task, split_train_eval  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "dvi/data/spec_bench/question_dev.jsonl"))
    parser.add_argument("--per-category", type=int, default=20, help="Held-out prompts timed per task (20: all of them).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/traffic_index_probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = SplitModel.load(ModelSpec())
    train, held = split_train_eval(load_prompts(args.prompts))
    timed = select_per_task(held, args.per_category, None)
    with_traffic = {"context": DecodeConfig(gamma=0, max_new_tokens=args.max_new_tokens),
                    "dvi": DecodeConfig(max_new_tokens=args.max_new_tokens)}
    configs = {**{name: replace(config, traffic_drafting=False) for name, config in with_traffic.items()},
               **{f"{name}+traffic": config for name, config in with_traffic.items()}}
    learned = TrafficIndex()
    learner = SpeculativeDecoder(split, traffic=learned)
    for i, q in enumerate(train):  # the training half's traffic, untimed
        learner.generate(encode_prompt(split.tokenizer, q.text), with_traffic["context"])
        print(f"traffic {i + 1}/{len(train)}", file=sys.stderr, end="\r")
    decoders = {name: SpeculativeDecoder(split, traffic=copy.deepcopy(learned)) for name in ("context", "context+traffic", "dvi", "dvi+traffic")}
    totals = {name: {"tokens": 0, "seconds": 0.0, "passes": 0, "traffic_drafted": 0, "traffic_accepted": 0} for name in decoders}
    names = list(decoders)
    for i, q in enumerate(timed):
        ids, reference = encode_prompt(split.tokenizer, q.text), None
        for name in names[i % len(names):] + names[: i % len(names)]:
            result = decoders[name].generate(ids, configs[name])
            reference = reference if reference is not None else result.token_ids
            if result.token_ids != reference:
                raise SystemExit(f"{name} decoded other tokens on prompt {i}: not lossless")
            t = totals[name]
            t["tokens"] += len(result.token_ids)
            t["seconds"] += result.seconds
            t["passes"] += result.verifier_passes
            t["traffic_drafted"] += result.traffic_drafted
            t["traffic_accepted"] += result.traffic_accepted
        print(f"timed {i + 1}/{len(timed)}", file=sys.stderr, end="\r")
    rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    rows = [f"| {name} | {t['tokens']} | {t['seconds']:.2f} | {rate[name]:.1f} | "
            f"{rate[name] / rate[name.split('+')[0]]:.3f} | {t['tokens'] / t['passes']:.2f} | {t['traffic_drafted']} / {t['traffic_accepted']} |"
            for name, t in totals.items()]
    report = "\n".join([
        f"{len(timed)} held-out prompts after {len(train)} training-half requests of traffic, {args.max_new_tokens} new tokens, "
        f"greedy, 1 thread, methods interleaved per prompt, every method token-identical; {machine_line()}",
        "",
        "| method | tokens | seconds | tokens/s | vs without the index | tau | traffic drafted / accepted |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic_index_probe.md").write_text(report + "\n")
    (out / "traffic_index_probe.json").write_text(json.dumps(
        {"totals": totals, "timed": len(timed), "traffic_requests": len(train), "index_ngrams_after_training_half": len(learned),
         "index_decays": learned.decays}, indent=2))


if __name__ == "__main__":
    main()
