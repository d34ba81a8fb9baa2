"""Offline probe for issue 13's route: would an EAGLE-style drafter, which runs no shallow layers,
agree with the verifier enough to replace the exit head on a CPU?

The exit head at k = 4 pays for four decoder layers, its exit layer and the draft LM head on every
draft step (0.17 of a forward on the CPUs measured). EAGLE's drafter runs one layer on the
verifier's own top-layer feature instead (about the price of our probe, 0.07-0.09 of a forward),
so at equal agreement it would cost half as much per drafted token. This measures its agreement
against the exit head's, with the same text, teacher, vocabulary, loss and budget.

Contract. On the default split (SmolLM2-135M, k = 4), reusing `eagle_input_probe.py`'s text (its
cached greedy continuations of stratified warm-start seeds, train, and 4 dev prompts per task,
held-out), teacher (one fp32 forward per sequence) and KL loss:
  A   the exit head as shipped in shape: a full-rank copy of decoder layer k on h_k(t), the frozen
      final norm and the frozen LM-head rows of the draft vocabulary -> q(x_{t+1}).
  E   EAGLE-1's drafter: x(t) = fc([f(t-1); e(x_t)]) (fc: Linear(2H, H) with bias, f = the verifier's
      normed top-layer state, hidden_states[-1]; f(-1) = 0; e = the model's frozen token embedding),
      then one decoder layer (a full-rank copy of the LAST decoder layer, or of layer k with
      --e-init k), then the frozen final norm and LM-head rows -> q(x_{t+1}). Loss: the same KL plus
      --reg-weight x smooth-L1(norm(o(t)), f(t)), EAGLE's feature regression, so that its own state
      can stand in for f on later drafts.
  E1  E teacher-forced: every position sees the verifier's f(t-1), exactly a block's FIRST draft
      (after a verify pass f of the last accepted position is free).
  E2  E where position t's input uses norm(o(t-1)), E's own state at t-1, in place of f(t-1), while
      every earlier position keeps its verifier-conditioned keys and values: a block's SECOND draft.
      (A has no such split: its later drafts see exact shallow states.)
  metric  held-out top-1 agreement over the generated positions, as `eagle_input_probe.evaluate`.
Output: docs/improve/eagle_head/eagle_head_<N>p.{md,json}.

Command (one thread; about 10 minutes once the text is cached, 4 more to write it):
  python benchmarks/eagle_head_probe.py --train-prompts 421 --epochs 4
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from eagle_input_probe import (  # noqa: E402
    OUT as TEXT_DIR, Head, draft_vocab, kl_loss, optimiser_step, probe_arguments, probe_start, probe_text, stage_table, teacher,
    training_order,
)

from learner.warmstart import lr_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "improve" / "eagle_head"


class EagleHead(Head):
    """EAGLE-1's drafter on the frozen model: fc([f(t-1); e(x_t)]) -> one decoder layer -> norm -> rows."""

    def __init__(self, split, layer: int, vocab: torch.Tensor):
        super().__init__(split, layer, vocab, fuse=False)
        H = split.model.config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.embed = nn.Parameter(split.model.model.embed_tokens.weight.detach().float().clone(), requires_grad=False)

    def eagle_inputs(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """x(t) = fc([feature(t-1); e(ids[t])]) for ids [T], feature [T, H] (zeros before t = 0)."""
        shifted = torch.cat([torch.zeros_like(feature[:1]), feature[:-1]], 0)
        return self.fc(torch.cat([shifted, self.embed[ids]], -1))

    def run(self, ids: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (E1): logits [T, V'] and normed own state [T, H]."""
        o = self.norm(self.state(self.eagle_inputs(ids, f)))
        return o @ self.rows.T, o

    def run_second(self, ids: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """E2: position t reads E's own normed state at t-1; earlier positions keep f's keys/values."""
        x1 = self.eagle_inputs(ids, f)
        own = self.norm(self.state(x1))
        x2 = self.eagle_inputs(ids, own)
        return self.norm(self.state_mixed(x1, x2)) @ self.rows.T


@torch.no_grad()
def agreement(pred_local: torch.Tensor, vocab: torch.Tensor, d: dict) -> tuple[int, int]:
    sl = slice(d["start"], len(d["top1"]) - 1)
    pred = vocab[pred_local]
    return int((pred[sl] == d["top1"][sl]).sum()), int(d["top1"][sl].numel())


@torch.no_grad()
def evaluate(head: nn.Module, data: list[dict], vocab: torch.Tensor, mode: str) -> float:
    hit = tot = 0
    for d in data:
        if mode == "A":
            lg = head(d["h"], None)
        elif mode == "E1":
            lg, _ = head.run(d["ids"], d["f"])
        else:
            lg = head.run_second(d["ids"], d["f"])
        h, n = agreement(lg.argmax(-1), vocab, d)
        hit, tot = hit + h, tot + n
    return hit / max(tot, 1)


def main() -> None:
    ap = probe_arguments(__doc__, 421)
    ap.add_argument("--reg-weight", type=float, default=1.0)
    ap.add_argument("--e-init", choices=("last", "k"), default="last")
    ap.add_argument("--heads", default="A,E", help="which heads to train, comma-separated (A, E)")
    args = ap.parse_args()
    t_start = time.time()
    split = probe_start(args, OUT)
    k, L = split.exit_layer, split.model.config.num_hidden_layers
    held, train = probe_text(split, args, TEXT_DIR / "sequences.json")
    tr, he = teacher(split, train, k, args.topk), teacher(split, held, k, args.topk)
    final_norm = split.model.model.norm.float()
    for d, s in list(zip(tr, train)) + list(zip(he, held)):
        d["ids"] = torch.tensor(s["ids"])
        with torch.no_grad():
            d["f"] = final_norm(d["F"])
    vocab, _, _ = draft_vocab(split, tr, args.draft_vocab)
    train_pos = sum(len(d["top1"]) for d in tr)
    held_pos = sum(len(d["top1"]) - 1 - d["start"] for d in he)
    print(f"train {len(tr)} seqs / {train_pos} positions; held-out {len(he)} seqs / {held_pos} scored positions", flush=True)

    order, marks = training_order(len(tr), args.epochs, args.seed, args.stages)
    steps = len(order)

    results: dict[str, list[dict]] = {}
    for name in args.heads.split(","):
        torch.manual_seed(args.seed)
        if name == "A":
            head, modes = Head(split, k, vocab, fuse=False), ("A",)
        else:
            head, modes = EagleHead(split, L - 1 if args.e_init == "last" else k, vocab), ("E1", "E2")
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        sched = lr_schedule(opt, "cosine", steps)
        curve = [{"stage": 0, "steps": 0, "train_s": 0.0, **{m: evaluate(head, he, vocab, m) for m in modes}}]
        print(name, curve[-1], flush=True)
        train_s, run_kl, run_reg, n = 0.0, 0.0, 0.0, 0
        for step, idx in enumerate(order, start=1):
            t0 = time.time()
            d = tr[idx]
            if name == "A":
                kl, reg = kl_loss(head(d["h"], None), d["local"], d["topk_lp"], d["valid"]), torch.zeros(())
            else:
                lg, own = head.run(d["ids"], d["f"])
                kl = kl_loss(lg, d["local"], d["topk_lp"], d["valid"])
                reg = F_.smooth_l1_loss(own, d["f"])
            loss = kl + args.reg_weight * reg
            optimiser_step(loss, opt, sched, params)
            train_s += time.time() - t0
            run_kl, run_reg, n = run_kl + float(kl.detach()), run_reg + float(reg.detach()), n + 1
            if step in marks:
                row = {"stage": len(curve), "steps": step, "train_s": round(train_s, 1), "kl": round(run_kl / n, 4),
                       "reg": round(run_reg / n, 4), **{m: evaluate(head, he, vocab, m) for m in modes}}
                run_kl, run_reg, n = 0.0, 0.0, 0
                curve.append(row)
                print(name, row, flush=True)
        results[name] = curve

    names = [m for name in args.heads.split(",") for m in (("A",) if name == "A" else ("E1", "E2"))]
    table = stage_table(names, {m: results["A" if m == "A" else "E"] for m in names}, args.stages, len(tr))
    meta = {
        "model": split.model_id, "exit_layer": k, "e_layer_init": f"copy of decoder layer {L - 1 if args.e_init == 'last' else k}",
        "train_prompts": len(tr), "train_positions": train_pos, "heldout_prompts": len(he),
        "heldout_scored_positions": held_pos, "max_new_tokens": args.max_new_tokens, "draft_vocab": len(vocab),
        "steps": steps, "epochs": args.epochs, "lr": args.lr, "reg_weight": args.reg_weight, "topk": args.topk,
        "schedule": "cosine", "batch": "one sequence per step (all its positions)",
        "teacher": "split.model fp32 (dequantised) forward over each sequence",
        "wall_s": round(time.time() - t_start, 1),
    }
    md = ("# EAGLE-style drafter against the exit head (issue 13's route)\n\n"
          "A: the exit head (k layers + exit layer), any draft. E1: EAGLE's drafter on a block's first draft "
          "(the verifier's feature); E2: on its second (its own feature).\n\n"
          + "\n".join(table) + "\n\n```json\n" + json.dumps(meta, indent=1) + "\n```\n")
    stem = f"eagle_head_{len(tr)}p" + ("" if args.e_init == "last" else "_init_k")
    (OUT / f"{stem}.md").write_text(md)
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "curves": results}, indent=1))
    print(md, flush=True)


if __name__ == "__main__":
    main()
