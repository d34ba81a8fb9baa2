"""Top-k agreement of the exit head on held-out prompts, split by whether context drafting matches.

    python benchmarks/topk_agreement.py [--adapter DIR] [--exit-layer K] [--prompts FILE]
                                        [--eval-prompts N] [--new-tokens T] [--out DIR]

Issue 13 measures the drafter by top-1 agreement; this probe asks two questions beside it:
  * where does the exit head actually draft? A block drafts from the context when the sequence's
    suffix occurred before (prompt lookup, DecodeConfig.context_*), so the head mostly answers
    at positions with no context match. Agreement is reported for both kinds of position;
  * how much would verifying several head candidates at once buy (a token tree, as EAGLE and
    Medusa verify)? The share of positions where the verifier's top-1 is among the head's top k,
    k = 1, 2, 4, 8, bounds the first draft token's acceptance of a tree of width k.
Held-out prompts and targets are the warm start's (`dvi warmstart`: the first N prompts of the
held-out half of every Spec-Bench category, the model's greedy continuation, every generated
position). Greedy, ungated, one torch thread. Prints and writes topk_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DecodeConfig  # noqa: E402
from common.core.context_draft import ContextIndex  # noqa: E402
from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.agreement import greedy_continuations, verifier_targets  # noqa: E402
from dvi.bench.drafter_probe import add_drafter_args, load_drafter  # noqa: E402
from dvi.bench.learning import split_train_eval, write_table_report  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402

WIDTHS = (1, 2, 4, 8)
KINDS = ("all", "context_match", "no_context_match")


def topk_hits(tokens: list[int], start: int, top1: torch.Tensor, top: torch.Tensor, max_ngram: int,
              min_ngram: int) -> tuple[dict[str, int], dict[str, dict[int, int]]]:
    """(positions, hits) per kind of position for one sequence: position p (start <= p < len(top1))
    predicts the token after tokens[:p + 1]; it is a `context_match` when context drafting
    (`ContextIndex` over tokens[:p + 1], n-grams min_ngram..max_ngram) would propose a token there.
    hits[kind][k] counts positions whose verifier top-1 (top1 [T] int64) is among the head's
    first k ids (top [T, >= max(WIDTHS)], best first)."""
    counts = {kind: 0 for kind in KINDS}
    hits = {kind: {k: 0 for k in WIDTHS} for kind in KINDS}
    index = ContextIndex(tokens[: start + 1], max_ngram, min_ngram)
    for p in range(start, top1.shape[0]):
        if p > start:
            index.extend([tokens[p]])
        matched = bool(index.propose(1)[0])
        for kind in ("all", "context_match" if matched else "no_context_match"):
            counts[kind] += 1
            for k in WIDTHS:
                hits[kind][k] += int(int(top1[p]) in top[p, :k].tolist())
    return counts, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drafter_args(parser)
    parser.add_argument("--prompts", default=str(Path(__file__).resolve().parents[1] / "dvi/data/spec_bench/question_dev.jsonl"))
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/topk_agreement")
    args = parser.parse_args()
    split = load_drafter(args)
    held = split_train_eval(load_prompts(args.prompts))[1][: args.eval_prompts]  # as `dvi warmstart` scores
    sequences, starts = greedy_continuations(split, [encode_prompt(split.tokenizer, q.text) for q in held], args.new_tokens)
    targets = verifier_targets(split, sequences, starts)
    decode = DecodeConfig()
    counts = {kind: 0 for kind in KINDS}
    hits = {kind: {k: 0 for k in WIDTHS} for kind in KINDS}
    vocab = split.draft_vocab
    split.exit_head.eval()
    with torch.inference_mode():
        for tokens, t in zip(sequences, targets):
            logits = split.drafter_logits(t.hidden, torch.arange(t.top1.shape[0]), rows=vocab)  # [T, V']
            top = vocab[logits.topk(max(WIDTHS), dim=-1).indices].cpu()  # [T, 8] full ids, best first
            seq_counts, seq_hits = topk_hits(tokens, t.start, t.top1, top, decode.context_ngram, decode.context_min_ngram)
            for kind in KINDS:
                counts[kind] += seq_counts[kind]
                for k in WIDTHS:
                    hits[kind][k] += seq_hits[kind][k]
    record = {
        "model": args.model, "exit_layer": args.exit_layer, "adapter": args.adapter or "default drafter",
        "draft_vocab_size": int(vocab.shape[0]), "held_out_prompts": len(held), "new_tokens": args.new_tokens,
        "positions": counts,
        "topk_agreement": {kind: {str(k): hits[kind][k] / max(1, counts[kind]) for k in WIDTHS} for kind in KINDS},
        "machine": machine_line(),
    }
    lines = [f"# Top-k agreement of the exit head ({args.model}, exit layer {args.exit_layer}, {record['adapter']})", "",
             f"{len(held)} held-out Spec-Bench prompts, {args.new_tokens} greedy tokens each; machine: {record['machine']}", "",
             "| positions | count | " + " | ".join(f"top-{k}" for k in WIDTHS) + " |",
             "|---|---:|" + "---:|" * len(WIDTHS)]
    for kind in KINDS:
        rates = record["topk_agreement"][kind]
        lines.append(f"| {kind} | {counts[kind]} | " + " | ".join(f"{100 * rates[str(k)]:.1f}%" for k in WIDTHS) + " |")
    print(write_table_report(args.out, "topk_agreement", record, lines), end="")


if __name__ == "__main__":
    main()
