"""Does text that carries a document teach the exit head the tasks it agrees least on?

    python benchmarks/document_seeds_probe.py [--documents N] [--per-task M] [--out DIR]

benchmarks/agreement_gap.py --per-task shows the shipped warm start agreeing least on Spec-Bench's
long-document tasks (summarisation, RAG, extraction: prompts of 300-800 tokens) while its seed
instructions, shipped and self-written, are short requests. This probe fine-tunes the default
drafter on document-grounded text the model writes itself, nothing from Spec-Bench:
  1. the model writes N articles, each answering "Write a detailed article ... about: <seed>" for
     one of its own self-written seed instructions (docs/warmstart/self_seeds.jsonl, from the end);
  2. each article becomes one request under a generic document task (summarise it, answer a
     question about it, extract its key facts, in turn), which the model answers like the warm
     start's corpus (WarmStartConfig's sampling);
  3. the drafter is distilled on those requests as the warm start distils (every position, the
     document included) at the learner's fine-tuning rate, since it starts trained.
Agreement is scored per Spec-Bench task (the first M dev prompts of each, neither half trained
on) before and after. Prints and writes document_seeds_probe.{json,md}. One torch thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.core.prompts import encode_prompt, load_prompts  # noqa: E402
from common.decoding.agreement import agreement, greedy_targets  # noqa: E402
from dvi.bench.drafter_probe import add_drafter_args, load_drafter, texts_by_category  # noqa: E402
from dvi.bench.learning import split_train_eval, write_table_report  # noqa: E402
from dvi.bench.speed import machine_line  # noqa: E402
from dvi.data import SPEC_BENCH_DEV  # noqa: E402
from learner.warmstart import WarmStartConfig, generate_corpus, train_warm_start  # noqa: E402

ARTICLE = "Write a detailed article of several paragraphs about the following: {seed}"
TASKS = (
    "Summarize the following article in a few sentences.\n\n{doc}",
    "{doc}\n\nBased on the text above, what is its main point, and what supports it?",
    "Extract the key facts from the following text as a bulleted list.\n\n{doc}",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_drafter_args(parser)
    parser.add_argument("--self-seeds", default=str(ROOT / "docs/warmstart/self_seeds.jsonl"))
    parser.add_argument("--documents", type=int, default=240)
    parser.add_argument("--document-tokens", type=int, default=384)
    parser.add_argument("--per-task", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=WarmStartConfig.epochs)
    parser.add_argument("--corpus", default="benchmarks/results/document_seeds_probe/corpus")
    parser.add_argument("--out", default="benchmarks/results/document_seeds_probe")
    args = parser.parse_args()
    split = load_drafter(args)
    tok = split.tokenizer
    started = time.perf_counter()

    seeds = [p.text for p in load_prompts(args.self_seeds)][-args.documents:]
    writing = replace(WarmStartConfig(), max_new_tokens=args.document_tokens, samples_per_prompt=1, self_seeds=0)
    articles, _ = generate_corpus(split, [encode_prompt(tok, ARTICLE.format(seed=s)) for s in seeds], writing,
                                  directory=args.corpus, on_request=lambda d, n: print(f"article {d}/{n}", end="\r", flush=True))
    docs = [tok.decode(t.tokens[t.prompt_length:].tolist(), skip_special_tokens=True).strip() for t in articles]
    requests = [encode_prompt(tok, TASKS[i % len(TASKS)].format(doc=d)) for i, d in enumerate(docs) if d]
    answering = replace(WarmStartConfig(), samples_per_prompt=1, self_seeds=0, epochs=args.epochs)
    corpus, _ = generate_corpus(split, requests, answering, directory=args.corpus,
                                on_request=lambda d, n: print(f"request {d}/{n}", end="\r", flush=True))
    generated = time.perf_counter() - started
    print(f"corpus: {len(corpus)} requests, mean prompt {sum(t.prompt_length for t in corpus) / len(corpus):.0f} tokens, "
          f"{sum(t.num_scored for t in corpus)} positions ({generated:.0f} s)", flush=True)

    other_half, held = split_train_eval(load_prompts(SPEC_BENCH_DEV))
    targets = {task: greedy_targets(split, [encode_prompt(tok, t) for t in texts], 64)
               for task, texts in texts_by_category(other_half + held, args.per_task).items()}
    everything = [t for ts in targets.values() for t in ts]
    before = {task: agreement(split, ts) for task, ts in targets.items()}
    _, curve = train_warm_start(split, corpus, everything[:: max(1, len(everything) // 24)], answering)
    after = {task: agreement(split, ts) for task, ts in targets.items()}

    rows = {task: {"positions": before[task].positions, "before": before[task].rate, "after": after[task].rate} for task in targets}
    pooled = {"before": sum(a.agreed for a in before.values()) / sum(a.positions for a in before.values()),
              "after": sum(a.agreed for a in after.values()) / sum(a.positions for a in after.values())}
    record = {"model": args.model, "exit_layer": args.exit_layer, "adapter": args.adapter or "default drafter",
              "documents": len(docs), "requests": len(corpus), "positions": sum(t.num_scored for t in corpus),
              "mean_prompt_tokens": sum(t.prompt_length for t in corpus) / len(corpus), "epochs": args.epochs,
              "steps": curve[-1].steps, "seconds": time.perf_counter() - started, "per_task": rows, "pooled": pooled,
              "machine": machine_line()}
    lines = [f"# Document-grounded self-distillation on top of the {record['adapter']} ({args.model}, exit layer {args.exit_layer})", "",
             f"{record['requests']} requests on {record['documents']} self-written articles (mean prompt "
             f"{record['mean_prompt_tokens']:.0f} tokens), {record['positions']} distilled positions, {record['steps']} steps "
             f"at the fine-tuning rate; first {args.per_task} dev prompts per task, 64 greedy tokens each; machine: {record['machine']}", "",
             "| Spec-Bench task | positions | before | after | change |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {task} | {r['positions']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | {100 * (r['after'] - r['before']):+.1f} |"
              for task, r in rows.items()]
    lines.append(f"| **all** | {sum(r['positions'] for r in rows.values())} | {100 * pooled['before']:.1f}% | "
                 f"{100 * pooled['after']:.1f}% | {100 * (pooled['after'] - pooled['before']):+.1f} |")
    print(write_table_report(args.out, "document_seeds_probe", record, lines), end="")


if __name__ == "__main__":
    main()
