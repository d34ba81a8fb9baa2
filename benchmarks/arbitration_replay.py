"""How much could any draft-source rule get out of today's exit head? An offline replay of the
decoder's block loop, with the rule the product uses, with an oracle, and with better heads.

    python benchmarks/arbitration_replay.py [--out DIR] [--max-new-tokens T] [--split tune|held-out]
        [--check N] [--drafter NAME=ADAPTER_DIR ...]

Goal (a) of issue 13 asks `dvi` for 1.15x `dvi_context`; it has measured 0.98-1.01x. Timed runs
cannot say whether the rule that picks a block's draft source (common/core/arbitration.py) is to
blame or the head itself, and they cost 12 minutes with ~2% noise. At temperature 0 the decoded
tokens are fixed (the model's greedy output), so every block's outcome can be replayed exactly
from recorded data: a context draft is accepted while it matches the output, and the exit head's
run of drafts is accepted while its top-1 along the output matches it (a draft after an accepted
one sees the same context as the output did).

Recorded once per model (cached in DIR/replay_inputs.json, not kept in git):
  * the greedy output of every Spec-Bench dev prompt (128 new tokens, chat template);
  * the exit head's top-1 and top-1 probability (its confidence) at every generated position,
    from the shipped warm start (`SplitModel.drafter_logits` over the draft vocabulary);
  * the costs the decoder prices blocks with (`SplitModel.costs`, timed on this machine), in
    one-row verifier passes, at 64-1,024 tokens of context.
Replayed with the product's own pieces (`ContextIndex`, `TrafficIndex`, `ContextStats`,
`DraftStats`, `best_context_length`, `choose_draft_source`, `worth_probing`) in `_draft`'s and
`_arbitrate`'s order (common/decoding/speculative.py). A block costs 1 (its verify pass) + r per
drafted row + p per exit-head step on a state the block computed (a probe, or the head's step after
a token's shallow pass) + (c - p) per head-drafted token's shallow pass, at its sequence's length.
Figure of merit: committed tokens per unit of cost (tokens per verifier pass, priced).

Approximations (why a replay is not a timing): costs are the decoder's own timed estimates, not
wall time; after a rejected head draft the head's confidence for the positions after it is read
along the output, so only the rejected tail's length (its rows) may differ from a live run; the
head's predictions are recorded in one pass over each sequence, where the decoder runs it a row
at a time (a near-tie could break the other way); a draft is capped by the recorded output's end,
where the decoder caps it by the token budget (it may draft past an EOS). `--check` measures what
they amount to against the decoder itself.

Policies (every one lossless: they only choose proposals):
  context     context drafting only (own context, then traffic), as `dvi_context`;
  dvi         the product's rule: per-request statistics, a probe of the head's confidence when
              `worth_probing` says so;
  dvi-decoder the same rule with the statistics carried from request to request (their
              forced-probe counters restart with each request; greedy requests only could do this
              without changing what a seeded sampled request decodes);
  oracle      per block, the best of the context's draft (as the product cuts it) and the head's
              drafts under the confidence stop with any limit up to gamma, by tokens per cost,
              knowing every outcome, with no probe. A per-block optimum, not a proof of a global
              bound, but far beyond what a rule that must predict the outcomes can reach;
  oracle-stop as oracle, and the head drafts exactly its agreeing run (up to gamma): what any
              rule and any confidence stop could get from this head's predictions, per block.
The confidence stop: the same replay with the head's stop at 0.2-0.7 instead of 0.5.
Cheaper pieces: the same replay with the timed costs scaled (a draft step and probe at half, a
verify row at half, all at half, rows free): what kernel work could buy for the head.
Better heads: at each generated position where the head disagrees, it is made to agree with
probability q (its confidence then drawn from the positions where it agrees today), for q = 0,
0.1, ..., 0.6: what agreement would a head need for 1.15x, under the product's rule and the
oracles? A head that got better would likely also be surer where it agrees, so the `sure` columns
give it confidence 0.9 there instead (the product's rule then drafts those positions).

Head agreement per task: each head's agreement on the replayed generated positions, per
Spec-Bench task.
Fidelity (--check N): the decoder itself (`SpeculativeDecoder`, `SplitModel.use_costs` with the
recorded costs, the same traffic) decodes the first N replayed prompts; its verifier passes and
head drafts per request are compared with the replay's.
Drafters (--drafter NAME=DIR, repeatable): other exit heads, e.g. the adapters `dvi bench speed
--learn` saves after online learning, recorded along the same outputs and replayed beside the
shipped one: goal (b) in priced passes, free of timing noise.

Split (as `dvi bench speed --learn`): the traffic index learns from the training half of every
task, then the held-out half is replayed (the index keeps learning from each replayed request, as
a service's would). `--split tune` replays the second half of each task's training half after its
first half instead (a tuning split: rules are compared there, the held-out half confirms).
Output: DIR/arbitration_replay.{md,json,png} (DIR/arbitration_replay_tune.* with --split tune).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.core.adaptive_gamma import DraftStats  # noqa: E402
from common.core.arbitration import (  # noqa: E402
    HEAD, ContextStats, best_context_length, choose_draft_source, worth_probing,
)
from common.core.config import DecodeConfig, TrafficConfig  # noqa: E402
from common.core.context_draft import ContextIndex  # noqa: E402
from common.core.prompts import spec_bench_task  # noqa: E402
from common.core.traffic_draft import TrafficIndex  # noqa: E402
from common.model.split import interpolated_costs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("context", "dvi", "dvi-decoder", "oracle", "oracle-stop")
BETTER = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
SCALINGS = {  # (draft step, verify row, probe) factors on the timed costs: what cheaper kernels would be worth
    "as timed": (1.0, 1.0, 1.0), "draft step and probe x0.5": (0.5, 1.0, 0.5), "verify row x0.5": (1.0, 0.5, 1.0),
    "all x0.5": (0.5, 0.5, 0.5), "verify rows free": (1.0, 0.0, 1.0),
}
TARGET = 1.15
SURE = 0.9


# --------------------------------------------------------------------------- recording (model)
def _load_split():
    import torch

    from common.core.config import ModelSpec
    from common.model.split import SplitModel

    torch.set_num_threads(1)
    return SplitModel.load(ModelSpec())


def head_predictions(split, prompt: list[int], output: list[int]) -> tuple[list[int], list[float]]:
    """The split's exit head along prompt + output: at each position predicting an output token,
    its top-1 (a full-vocabulary id, argmax over its draft vocabulary) and that top-1's probability."""
    import torch

    with torch.no_grad():
        seq = prompt + output
        hidden = split.shallow(torch.tensor([seq]), torch.arange(len(seq))[None], split.new_cache(len(seq)))[0]
        vocab = split.draft_vocab
        logits = split.drafter_logits(hidden, torch.arange(len(prompt) - 1, len(seq) - 1), rows=vocab)
        confidence, index = torch.softmax(logits.float(), -1).max(-1)
    return vocab[index].tolist(), [round(float(c), 4) for c in confidence]


def record(path: Path, prompts_path: str, max_new_tokens: int) -> dict:
    """Greedy outputs, the default head's top-1/confidence along them and the timed costs (module doc)."""
    from common.core.prompts import encode_prompt, load_prompts
    from common.decoding.speculative import SpeculativeDecoder
    from dvi.bench.learning import split_train_eval
    from dvi.bench.speed import machine_line

    split = _load_split()
    train, held = split_train_eval(load_prompts(prompts_path))
    decoder = SpeculativeDecoder(split)
    config = DecodeConfig(gamma=0, max_new_tokens=max_new_tokens, traffic_drafting=False)
    rows = []
    for part, prompts in (("train", train), ("held", held)):
        for q in prompts:
            ids = encode_prompt(split.tokenizer, q.text)
            output = decoder.generate(ids, config).token_ids
            top1, confidence = head_predictions(split, ids, output)
            rows.append({"part": part, "category": q.category, "prompt": ids, "output": output,
                         "head_top1": top1, "head_confidence": confidence, "drafters": {}})
            print(f"recorded {len(rows)}", file=sys.stderr, end="\r")
    costs = {str(n): list(split.costs(n)) for n in split.COST_CONTEXTS}  # the decoder's own timings
    data = {"machine": machine_line(), "max_new_tokens": max_new_tokens, "costs": costs, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return data


def record_drafters(path: Path, data: dict, adapters: dict[str, str]) -> None:
    """Add each adapter's head predictions along the recorded outputs (rows' "drafters"), once."""
    missing = {name: d for name, d in adapters.items() if any(name not in row.get("drafters", {}) for row in data["rows"])}
    if not missing:
        return
    split = _load_split()
    for name, directory in missing.items():
        split.load_adapter(directory)
        for row in data["rows"]:
            row.setdefault("drafters", {})[name] = head_predictions(split, row["prompt"], row["output"])
    path.write_text(json.dumps(data))


def check_against_decoder(data: dict, feed: list[dict], evaluate: list[dict], costs: "Costs") -> list[dict]:
    """The decoder itself (`SpeculativeDecoder`, the recorded costs, a traffic index fed as the
    replay feeds its own) on `evaluate` in order, for the `context` and `dvi` policies: verifier
    passes and exit-head drafts against the replay's, per request."""
    from common.decoding.speculative import SpeculativeDecoder

    split = _load_split()
    split.use_costs(costs.points)
    out = []
    for policy, config in (("context", DecodeConfig(gamma=0, max_new_tokens=data["max_new_tokens"])),
                           ("dvi", DecodeConfig(max_new_tokens=data["max_new_tokens"]))):
        traffic = TrafficIndex(TrafficConfig())
        for row in feed:
            traffic.add(row["prompt"] + row["output"])
        decoder = SpeculativeDecoder(split, traffic=traffic)
        results = [decoder.generate(row["prompt"], config) for row in evaluate]
        if any(r.token_ids != row["output"] for r, row in zip(results, evaluate)):
            raise SystemExit(f"{policy}: the decoder's output differs from the recorded one")
        replayed = replay(feed, evaluate, policy, costs)
        out.append({"policy": policy, "requests": len(evaluate),
                    "passes": sum(r.verifier_passes for r in results), "replayed_passes": replayed.blocks,
                    "equal_requests": sum(r.verifier_passes == b for r, b in zip(results, replayed.blocks_per_request)),
                    "head_drafted": sum(r.drafted for r in results), "head_accepted": sum(r.accepted for r in results),
                    "replayed_head_drafted": replayed.head_drafted, "replayed_head_accepted": replayed.head_accepted})
    return out


# --------------------------------------------------------------------------- replay (pure)
class Costs:
    """(draft step c, verify row r, probe p) in one-row verifier passes at any sequence length, from
    the recorded timings, interpolated as the decoder interpolates them (`SplitModel.costs`)."""

    def __init__(self, timed: dict[str, list[float]]):
        self.points = sorted((int(n), tuple(v)) for n, v in timed.items())

    def at(self, length: int) -> tuple[float, float, float]:
        return interpolated_costs(self.points, length)


@dataclass
class Totals:
    tokens: int = 0
    cost: float = 0.0
    blocks: int = 0
    head_blocks: int = 0
    head_over_context: int = 0
    head_drafted: int = 0
    head_accepted: int = 0
    probes: int = 0
    blocks_per_request: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.cost if self.cost else 0.0

    @property
    def tau(self) -> float:
        return self.tokens / self.blocks if self.blocks else 0.0


def _run_length(draft: list[int], truth: list[int]) -> int:
    n = 0
    while n < len(draft) and draft[n] == truth[n]:
        n += 1
    return n


def replay(feed: list[dict], evaluate: list[dict], policy: str, costs: Costs, heads: list[tuple[list[int], list[float]]] | None = None,
           config: DecodeConfig = DecodeConfig()) -> Totals:
    """Replay `evaluate` (rows of `record`) under `policy` after a traffic index learned from `feed`.
    heads: per evaluated row, (top-1, confidence) along its output (default: the recorded head)."""
    traffic = TrafficIndex(TrafficConfig())
    for row in feed:
        traffic.add(row["prompt"] + row["output"])
    carried_context, carried_draft = ContextStats(), DraftStats()
    thr, gamma_max, totals = config.confidence_threshold, config.gamma, Totals()
    for i, row in enumerate(evaluate):
        prompt, truth = row["prompt"], row["output"]
        top1, confidence = heads[i] if heads is not None else (row["head_top1"], row["head_confidence"])
        index = ContextIndex(list(prompt), config.context_ngram, config.context_min_ngram, traffic)
        if policy == "dvi-decoder":
            context_stats, draft_stats = copy.deepcopy(carried_context), copy.deepcopy(carried_draft)
            context_stats.since_probe = draft_stats.since_draft = 0
        else:
            context_stats, draft_stats = ContextStats(), DraftStats()
        done, blocks_before = 0, totals.blocks
        while done < len(truth):
            room = len(truth) - done - 1
            c, r, p = costs.at(len(prompt) + done)
            context, ngram = index.propose(min(config.context_tokens, room)) if room > 0 else ([], 0)
            if context:
                context = context[: best_context_length(len(context), context_stats.estimate(ngram), 0.0, r)]
            head_on = policy != "context" and room > 0
            gamma = draft_stats.gamma(min(gamma_max, room), c, r) if head_on else 0

            def head_draft(g: int, stop_at_agreement: bool = False) -> tuple[int, int, int]:
                """(drafted, accepted, head steps) of a head block of at most g drafts."""
                if stop_at_agreement:
                    run = _run_length(top1[done: done + g], truth[done: done + g])
                    return run, run, min(run + 1, g)
                drafted = steps = 0
                while drafted < g:
                    steps += 1
                    if confidence[done + drafted] < thr:
                        break
                    drafted += 1
                return drafted, _run_length(top1[done: done + drafted], truth[done:]), steps

            use_head, probed = head_on and not context, False
            if head_on and policy.startswith("oracle"):
                def head_rate(g: int) -> float:
                    drafted, accepted, steps = head_draft(g, policy == "oracle-stop")
                    return (accepted + 1) / (1 + steps * p + drafted * (c - p + r))

                # the head's best draft limit knowing the outcome (oracle-stop: the longest is best)
                rates = {g: head_rate(g) for g in range(1, min(gamma_max, room) + 1)}
                gamma = max(rates, key=lambda g: (rates[g], -g))
                context_rate = (_run_length(context, truth[done:]) + 1) / (1 + r * len(context))
                use_head = not context or rates[gamma] > context_rate
            elif head_on and context:
                args = (len(context), context_stats.estimate(ngram), gamma,
                        draft_stats.prior if draft_stats.acceptance is None else draft_stats.acceptance)
                if choose_draft_source(*args, None, c, thr, r, context_cost=0.0) == HEAD:
                    if worth_probing(*args, c, r, context_stats.win_rate, context_cost=0.0, probe_cost=p) or context_stats.probe_due():
                        probed = True
                        use_head = choose_draft_source(*args, confidence[done], c, thr, r, context_cost=0.0) == HEAD
                        context_stats.observe_probe(True, use_head)
                    else:
                        context_stats.observe_probe(False)
            cost = 1.0 + (p if probed else 0.0)
            totals.probes += probed
            if use_head and (gamma > 0 or not context):
                drafted, accepted, steps = head_draft(gamma, policy == "oracle-stop")
                steps -= 1 if probed and steps else 0  # the probe was the first step
                cost += steps * p + drafted * (c - p) + r * drafted
                draft_stats.observe_block(drafted, accepted)
                totals.head_blocks += 1
                totals.head_over_context += bool(context)
                totals.head_drafted += drafted
                totals.head_accepted += accepted
            else:
                accepted = _run_length(context, truth[done:])
                if context:
                    context_stats.observe_block(ngram, len(context), accepted)
                cost += r * len(context)
            commit = truth[done: done + accepted + 1]
            index.extend(commit)
            done += len(commit)
            totals.blocks += 1
            totals.cost += cost
        totals.tokens += len(truth)
        totals.blocks_per_request.append(totals.blocks - blocks_before)
        traffic.add(prompt + truth)
        carried_context, carried_draft = context_stats, draft_stats
    return totals


def better_heads(rows: list[dict], q: float, seed: int = 0, sure: float | None = None) -> list[tuple[list[int], list[float]]]:
    """Each row's head made to agree at a disagreeing position with probability q, its confidence
    there drawn from the confidences of the positions where the recorded head agrees (or `sure`)."""
    agreed = [c for row in rows for t, o, c in zip(row["head_top1"], row["output"], row["head_confidence"]) if t == o]
    heads = []
    for i, row in enumerate(rows):
        rng = random.Random(seed * 100_003 + i)
        top1, confidence = list(row["head_top1"]), list(row["head_confidence"])
        for j, token in enumerate(row["output"]):
            if top1[j] != token and rng.random() < q:
                top1[j], confidence[j] = token, (rng.choice(agreed) if sure is None else sure)
        heads.append((top1, confidence))
    return heads


def agreement(rows: list[dict], heads: list[tuple[list[int], list[float]]]) -> float:
    agreed = sum(t == o for row, (top1, _) in zip(rows, heads) for t, o in zip(top1, row["output"]))
    return agreed / max(1, sum(len(row["output"]) for row in rows))


def halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(first half, second half) of each task's rows, each interleaved across tasks: the split
    `dvi bench speed --learn` makes (`split_train_eval`)."""
    from types import SimpleNamespace

    from dvi.bench.learning import split_train_eval

    first, second = split_train_eval([SimpleNamespace(category=row["category"], row=row) for row in rows])
    return [w.row for w in first], [w.row for w in second]


# --------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", default=str(ROOT / "dvi/data/spec_bench/question_dev.jsonl"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--split", choices=("held-out", "tune"), default="held-out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/arbitration_replay"))
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="Also decode the first N replayed prompts with the decoder itself and the recorded costs, and compare.")
    ap.add_argument("--drafter", action="append", default=[], metavar="NAME=DIR",
                    help="Also replay the exit head of this adapter (e.g. one `dvi bench speed --learn` saved); repeatable.")
    args = ap.parse_args()
    if args.check < 0:
        ap.error(f"--check must be >= 0, got {args.check}")
    drafters = dict(_named_directory(item) for item in args.drafter)
    out = Path(args.out)
    cache = out / "replay_inputs.json"
    data = json.loads(cache.read_text()) if cache.exists() else record(cache, args.prompts, args.max_new_tokens)
    record_drafters(cache, data, drafters)
    costs = Costs(data["costs"])
    train = [row for row in data["rows"] if row["part"] == "train"]
    feed, evaluate = halves(train) if args.split == "tune" else (train, [row for row in data["rows"] if row["part"] == "held"])

    results = {name: replay(feed, evaluate, name, costs) for name in POLICIES}
    base = results["context"].rate
    lines = [f"# Draft-source rules replayed ({args.split} split: {len(feed)} requests of traffic, {len(evaluate)} replayed)", "",
             "`python benchmarks/arbitration_replay.py " + " ".join(sys.argv[1:]) + "`", "",
             f"Machine: {data['machine']}. Costs (draft step, verify row, probe) in one-row passes, timed at load:",
             ", ".join(f"{n} tokens {tuple(round(x, 3) for x in v)}" for n, v in data["costs"].items()) + ".", "",
             "| policy | tokens per priced pass | vs `context` | tau | head blocks (over a context match) | head drafted / accepted | probes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, t in results.items():
        lines.append(f"| {name} | {t.rate:.4f} | {t.rate / base:.3f}x | {t.tau:.3f} | {t.head_blocks} ({t.head_over_context}) "
                     f"| {t.head_drafted} / {t.head_accepted} | {t.probes} |")
    sweep = []
    for q in BETTER:
        heads = better_heads(evaluate, q)
        row = {"q": q, "agreement": agreement(evaluate, heads)}
        for name in ("dvi", "oracle", "oracle-stop"):
            row[name] = replay(feed, evaluate, name, costs, heads).rate / base
        sure = better_heads(evaluate, q, sure=SURE)
        for name in ("dvi", "oracle"):
            row[f"{name}, sure"] = replay(feed, evaluate, name, costs, sure).rate / base
        sweep.append(row)
    lines += ["", f"Better heads (agreement over the replayed generated positions; ratios against `context`, target {TARGET}x):", "",
              f"| q | head agreement | dvi (product rule) | oracle | oracle-stop | dvi, sure ({SURE}) | oracle, sure ({SURE}) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['q']:.1f} | {r['agreement']:.1%} | {r['dvi']:.3f}x | {r['oracle']:.3f}x | {r['oracle-stop']:.3f}x "
              f"| {r['dvi, sure']:.3f}x | {r['oracle, sure']:.3f}x |" for r in sweep]
    stops = []
    for threshold in THRESHOLDS:
        config = DecodeConfig(confidence_threshold=threshold)
        stops.append({"threshold": threshold, **{name: replay(feed, evaluate, name, costs, config=config).rate / base
                                                  for name in ("dvi", "oracle")}})
    lines += ["", f"The confidence stop (`DecodeConfig.confidence_threshold`, {DecodeConfig().confidence_threshold} in the product; "
              "ratios against `context`):", "", "| threshold | dvi (product rule) | oracle |", "|---:|---:|---:|"]
    lines += [f"| {r['threshold']:.1f} | {r['dvi']:.3f}x | {r['oracle']:.3f}x |" for r in stops]
    scaled = []
    for label, factors in SCALINGS.items():
        cheaper = Costs({n: [x * f for x, f in zip(v, factors)] for n, v in data["costs"].items()})
        context_rate = replay(feed, evaluate, "context", cheaper).rate
        scaled.append({"costs": label, **{name: replay(feed, evaluate, name, cheaper).rate / context_rate
                                          for name in ("dvi", "oracle", "oracle-stop")}})
    lines += ["", "Cheaper pieces (the timed costs scaled; each row's ratios against `context` at the same costs):", "",
              "| costs | dvi (product rule) | oracle | oracle-stop |", "|---|---:|---:|---:|"]
    lines += [f"| {r['costs']} | {r['dvi']:.3f}x | {r['oracle']:.3f}x | {r['oracle-stop']:.3f}x |" for r in scaled]
    compared = []
    for name in ["dvi (the shipped warm start)", *drafters]:
        heads = None if name not in drafters else [tuple(row["drafters"][name]) for row in evaluate]
        chosen = heads or [(row["head_top1"], row["head_confidence"]) for row in evaluate]
        compared.append({"drafter": name, "agreement": agreement(evaluate, chosen),
                         **{policy: replay(feed, evaluate, policy, costs, heads).rate / base for policy in ("dvi", "oracle", "oracle-stop")}})
    if drafters:
        lines += ["", "Drafters (each exit head replayed with the product's rule and the oracles; ratios against `context`):", "",
                  "| drafter | head agreement | dvi (product rule) | oracle | oracle-stop |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['drafter']} | {r['agreement']:.1%} | {r['dvi']:.3f}x | {r['oracle']:.3f}x | {r['oracle-stop']:.3f}x |"
                  for r in compared]
    tasks = list(dict.fromkeys(spec_bench_task(row["category"]) for row in evaluate))
    names = ["dvi (the shipped warm start)", *drafters]
    per_task = []
    for task in tasks:
        rows = [row for row in evaluate if spec_bench_task(row["category"]) == task]
        entry = {"task": task, "positions": sum(len(row["output"]) for row in rows)}
        for name in names:
            heads = [(row["head_top1"], row["head_confidence"]) if name not in drafters else tuple(row["drafters"][name]) for row in rows]
            entry[name] = agreement(rows, heads)
        per_task.append(entry)
    lines += ["", "Head agreement per task (generated positions of the replayed prompts):", "",
              "| task | positions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    lines += [f"| {e['task']} | {e['positions']} | " + " | ".join(f"{e[name]:.1%}" for name in names) + " |" for e in per_task]
    checked = check_against_decoder(data, feed, evaluate[: args.check], costs) if args.check > 0 else []
    if checked:
        lines += ["", f"Fidelity: the decoder itself on the first {args.check} replayed prompts, with the recorded costs:", "",
                  "| policy | verifier passes (decoder / replay) | requests with equal passes | head drafted / accepted (decoder / replay) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {c['policy']} | {c['passes']} / {c['replayed_passes']} | {c['equal_requests']} of {c['requests']} "
                  f"| {c['head_drafted']} / {c['head_accepted']} against {c['replayed_head_drafted']} / {c['replayed_head_accepted']} |"
                  for c in checked]
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    stem = "arbitration_replay" if args.split == "held-out" else "arbitration_replay_tune"
    (out / f"{stem}.md").write_text(text)
    summary = {name: {"rate": t.rate, "vs_context": t.rate / base, "tau": t.tau, "head_blocks": t.head_blocks,
                      "head_over_context": t.head_over_context, "head_drafted": t.head_drafted,
                      "head_accepted": t.head_accepted, "probes": t.probes} for name, t in results.items()}
    (out / f"{stem}.json").write_text(json.dumps({"machine": data["machine"], "split": args.split, "costs": data["costs"],
                                                             "policies": summary, "better_heads": sweep,
                                                             "confidence_stop": stops, "cheaper": scaled,
                                                             "drafters": compared, "fidelity": checked,
                                                             "agreement_per_task": per_task}, indent=1))
    plot(sweep, out / f"{stem}.png")


def _named_directory(item: str) -> tuple[str, str]:
    name, sep, directory = item.partition("=")
    if not sep or not name or not directory:
        raise SystemExit(f"--drafter takes NAME=DIR, got {item!r}")
    if not Path(directory).is_dir():
        raise SystemExit(f"--drafter {name}: {directory} is not a directory")
    return name, directory


def plot(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [100 * r["agreement"] for r in sweep]
    for name, style in (("dvi", "o-"), ("oracle", "s--"), ("oracle-stop", "^:"), ("dvi, sure", "o-"), ("oracle, sure", "s--")):
        ax.plot(x, [r[name] for r in sweep], style, label=name, alpha=0.45 if "sure" in name else 1.0)
    ax.axhline(TARGET, color="grey", lw=0.8)
    ax.set_xlabel("exit-head agreement on generated positions (%)")
    ax.set_ylabel("tokens per priced pass vs context drafting")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
