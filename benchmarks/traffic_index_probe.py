"""Would a drafter learned from traffic without gradients pay? A cross-request n-gram index beside context drafting.

    python benchmarks/traffic_index_probe.py [--per-category N] [--max-new-tokens T] [--out DIR]

Context drafting (`common/core/context_draft.py`) looks only at the request's own tokens. This
probe adds a `TrafficIndex`: the next-token counts of every 2-4-gram over all the requests served
so far. Where the request's own context matches only its last token (or nothing), the block
drafts the index's most frequent continuation instead, token by token while that continuation
holds at least half of its n-gram's count and has been seen twice. It is a drafter that learns
from traffic with no gradient step, priced and arbitrated as a context draft (its acceptance
kept apart, under negative n-gram lengths).

Protocol, as `dvi bench speed --learn` splits the dev prompts: the index first learns from
serving the training half of every Spec-Bench category (every prompt, untimed, greedy, its
prompt and output added); then the first N held-out prompts of every task are timed with four
methods interleaved per prompt in rotating order, each decoding with one torch thread: context
drafting only and the full decoder, each without and with the index. The index keeps learning
from the held-out prompts as they are served (each method's own copy, after its own request), as
a service would. Every method must decode the tokens of the first (checked). Prints and writes
traffic_index_probe.{json,md}. Not part of the product: measured on 2026-12-07 and not kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DecodeConfig, ModelSpec  # noqa: E402
from common.core.context_draft import ContextIndex  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.speculative import SpeculativeDecoder  # noqa: E402
from common.model.split import SplitModel  # noqa: E402
from dvi.bench.learning import select_per_task, split_train_eval  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402


class TrafficIndex:
    """Next-token counts of the n-grams (n = min_ngram..max_ngram) of every sequence added."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, share: float = 0.5, min_count: int = 2):
        self.max_ngram, self.min_ngram, self.share, self.min_count = max_ngram, min_ngram, share, min_count
        self.counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)

    def add(self, tokens: list[int]) -> None:
        for p in range(1, len(tokens)):
            for n in range(self.min_ngram, min(self.max_ngram, p) + 1):
                self.counts[tuple(tokens[p - n:p])][tokens[p]] += 1

    def _next(self, context: list[int]) -> tuple[int | None, int]:
        """(the next token, or None below the share / count bar; the longest matched n, 0 if none)."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            counts = self.counts.get(tuple(context[-n:]))
            if counts:
                token, count = counts.most_common(1)[0]
                confident = count >= self.min_count and count >= self.share * sum(counts.values())
                return (token if confident else None), n
        return None, 0

    def propose(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """(up to max_tokens tokens following `tokens`, the first step's matched n-gram length)."""
        out: list[int] = []
        context, first = list(tokens[-self.max_ngram:]), 0
        for i in range(max_tokens):
            token, n = self._next(context)
            first = n if i == 0 else first
            if token is None:
                break
            out.append(token)
            context = (context + [token])[-self.max_ngram:]
        return out, first


class ContextWithTraffic(ContextIndex):
    """The request's own context index, falling back to the traffic index where the request's
    context matches at most one token; a traffic draft reports its n-gram length negated, so the
    decoder keeps its acceptance apart from the context's."""

    traffic: TrafficIndex

    def propose(self, max_tokens: int) -> tuple[list[int], int]:
        own, n = super().propose(max_tokens)
        if n <= 1 and max_tokens > 0:
            pooled, pooled_n = self.traffic.propose(self.tokens, max_tokens)
            if pooled:
                return pooled, -pooled_n
        return own, n


class TrafficDecoder(SpeculativeDecoder):
    """The product's decoder with a traffic index: each request drafts from it (above) and adds
    its prompt and output to it when it finishes."""

    def __init__(self, split: SplitModel, traffic: TrafficIndex):
        super().__init__(split)
        self.traffic = traffic

    def start(self, prompt_ids, config, **kwargs):
        state = super().start(prompt_ids, config, **kwargs)
        if state.context is not None:  # the same index, now also consulting the traffic
            state.context.__class__ = ContextWithTraffic
            state.context.traffic = self.traffic
        return state

    def finish(self, state):
        result = super().finish(state)
        self.traffic.add(state.tokens)
        return result


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
    configs = {"context": DecodeConfig(gamma=0, max_new_tokens=args.max_new_tokens),
               "dvi": DecodeConfig(max_new_tokens=args.max_new_tokens)}
    learned = TrafficIndex()
    learner = TrafficDecoder(split, learned)
    for i, q in enumerate(train):  # the training half's traffic, untimed
        learner.generate(encode_prompt(split.tokenizer, q.text), configs["context"])
        print(f"traffic {i + 1}/{len(train)}", file=sys.stderr, end="\r")
    decoders = {"context": SpeculativeDecoder(split), "context+traffic": TrafficDecoder(split, copy.deepcopy(learned)),
                "dvi": SpeculativeDecoder(split), "dvi+traffic": TrafficDecoder(split, copy.deepcopy(learned))}
    totals = {name: {"tokens": 0, "seconds": 0.0, "passes": 0} for name in decoders}
    names = list(decoders)
    for i, q in enumerate(timed):
        ids, reference = encode_prompt(split.tokenizer, q.text), None
        for name in names[i % len(names):] + names[: i % len(names)]:
            result = decoders[name].generate(ids, configs[name.split("+")[0]])
            reference = reference if reference is not None else result.token_ids
            if result.token_ids != reference:
                raise SystemExit(f"{name} decoded other tokens on prompt {i}: not lossless")
            t = totals[name]
            t["tokens"] += len(result.token_ids)
            t["seconds"] += result.seconds
            t["passes"] += result.verifier_passes
        print(f"timed {i + 1}/{len(timed)}", file=sys.stderr, end="\r")
    rate = {name: t["tokens"] / t["seconds"] for name, t in totals.items()}
    rows = [f"| {name} | {t['tokens']} | {t['seconds']:.2f} | {rate[name]:.1f} | "
            f"{rate[name] / rate[name.split('+')[0]]:.3f} | {t['tokens'] / t['passes']:.2f} |" for name, t in totals.items()]
    report = "\n".join([
        f"{len(timed)} held-out prompts after {len(train)} training-half requests of traffic, {args.max_new_tokens} new tokens, "
        f"greedy, 1 thread, methods interleaved per prompt, every method token-identical; {machine_line()}",
        "",
        "| method | tokens | seconds | tokens/s | vs without the index | tau |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "traffic_index_probe.md").write_text(report + "\n")
    (out / "traffic_index_probe.json").write_text(json.dumps({"totals": totals, "timed": len(timed), "traffic_requests": len(train)}, indent=2))


if __name__ == "__main__":
    main()
