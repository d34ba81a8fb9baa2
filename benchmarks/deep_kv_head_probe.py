"""Offline probe for issue 13's route: does the exit head agree more with the verifier when its
attention reads the verifier's deep states of the positions already verified (GliDe's idea, kept
self-speculative), instead of only its own shallow ones?

At a block's first draft every earlier position has been through the verifier, so its deep state
(the last decoder layer's output) is free; only the block's input token has a shallow state alone.
The exit head today attends over its own keys and values of the shallow states h_k(s). Here the
exit layer's keys and values for a verified position s come from the deep state instead, through
their own trainable norm and k/v projections (initialised from the exit layer's); the draft
positions of the block (the query and the head's own earlier drafts) keep their shallow ones. In a
decoder this costs one norm and two small projections per committed token (about 0.2M multiply-adds
against ~135M for a forward), and the exit layer's attention reads that cache in place of its own.

Contract. On the default split (SmolLM2-135M, k = 4), reusing `eagle_input_probe.py`'s text (its
cached greedy continuations of stratified warm-start seeds, train, and 4 dev prompts per task,
held-out), teacher (one fp32 forward per sequence; D = the last decoder layer's pre-norm output, or
`--deep-layer j`: hidden_states[j], the input of decoder layer j), draft vocabulary and KL loss:
  A   the exit head as shipped in shape: a full-rank copy of decoder layer k on h_k(t), the frozen
      final norm and LM-head rows of the draft vocabulary, every key and value shallow;
  G   the same layer and initialisation, plus deep_norm, deep_k, deep_v (copies of the layer's input
      norm and k/v projections). Query t, with draft depth d: keys and values of s in (t - d, t] from
      h_k(s) (the draft positions of the block), of s <= t - d from D(s) (verified positions).
      G1 is a block's first draft (d = 1), G2 its second, G3 its third. Trained at `--train-depth`
      (1, or `mix`: d uniform in 1..3 per step). `--keys both`: verified positions keep their
      shallow keys and values and gain deep ones beside them (deep values start at zero, deep
      scores start 4 lower through a learned per-head bias, so G starts close to A).
      `--keys gated`: the exit head's own attention unchanged, plus tanh(gate) x a second attention
      over the verified positions' deep keys and values (gate per head, zero at the start: G
      starts exactly as A; Flamingo's gated cross-attention).
  R   A trained with EAGLE's feature regression as well: KL + `--reg-weight` x smooth-L1 between
      the final norm of its exit-layer output and of the verifier's last-layer output (the deep
      state as a target, not an input; the LM head is shared, so matching it matches the logits).
  metric  held-out top-1 agreement over the generated positions, as `eagle_head_probe.agreement`.
`--start warm`: every head starts from the shipped warm start instead (its exit layer, merged
LM-head rows and draft vocabulary; G's deep projections copied from that exit layer) and fine-tunes
on the same text: does a trained head use what it can newly see? `--deep-lr` sets the rate of G's
new parameters (fine-tuning runs at `--lr 1e-4`, the learner's fine-tuning rate).
All heads have identical budgets (steps, order, lr, schedule). Output:
docs/improve/deep_kv_head/deep_kv_head_<N>p[_<variant>].{md,json}.

Commands (one thread; about 12 minutes each once the text is cached, 8 more to write it):
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 4
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 4 --heads G --keys both
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 4 --heads G --deep-layer 15
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 4 --heads R
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 2 --lr 1e-4 --start warm --heads A
  python benchmarks/deep_kv_head_probe.py --train-prompts 421 --epochs 2 --lr 1e-4 --start warm --heads G \
      --keys gated --deep-lr 1e-3   (and 1e-2)
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from eagle_head_probe import agreement  # noqa: E402
from eagle_input_probe import (  # noqa: E402
    OUT as TEXT_DIR, Head, draft_vocab, kl_loss, optimiser_step, probe_arguments, probe_start, probe_text, stage_table, teacher,
    training_order,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from common.model.split import lora_merged_weight  # noqa: E402
from learner.warmstart import lr_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "improve" / "deep_kv_head"


class DeepKVHead(Head):
    """The exit head whose verified positions' keys and values come from the verifier's deep states."""

    def __init__(self, split, k: int, vocab: torch.Tensor, keys: str = "replace"):
        super().__init__(split, k, vocab, fuse=False)
        a = self.layer.self_attn
        self.keys = keys
        self.deep_norm = copy.deepcopy(self.layer.input_layernorm)
        self.deep_k = copy.deepcopy(a.k_proj)
        self.deep_v = copy.deepcopy(a.v_proj)
        if keys == "both":  # starts as A: deep values zero, deep scores pushed down by a learned per-head bias
            nn.init.zeros_(self.deep_v.weight)
            self.deep_bias = nn.Parameter(torch.full((self.nh, 1, 1), -4.0))
        if keys == "gated":  # a second attention, over the deep states only, added through a zero gate
            self.deep_gate = nn.Parameter(torch.zeros(self.nh, 1, 1))

    def _deep_kv(self, D: torch.Tensor, cos, sin):
        T = D.shape[0]
        y = self.deep_norm(D)
        kk = self.deep_k(y).view(T, self.nkv, self.hd).transpose(0, 1)[None]
        v = self.deep_v(y).view(T, self.nkv, self.hd).transpose(0, 1)[None]
        _, kk = apply_rotary_pos_emb(kk, kk, cos, sin)
        rep = self.nh // self.nkv
        return kk[0].repeat_interleave(rep, 0), v[0].repeat_interleave(rep, 0)

    def run(self, h: torch.Tensor, D: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits [T, V'] when every position t is a draft at `depth` (1: the block's first)."""
        cos, sin = self._rope(h)
        q, k_sh, v_sh = self._qkv(h, cos, sin)
        k_dp, v_dp = self._deep_kv(D, cos, sin)
        T = h.shape[0]
        t = torch.arange(T)
        lag = t[:, None] - t[None, :]  # t - s
        shallow = (lag >= 0) & (lag < depth)
        scale = self.hd ** -0.5
        s_sh, s_dp = (q @ k_sh.transpose(-1, -2)) * scale, (q @ k_dp.transpose(-1, -2)) * scale
        if self.keys == "gated":  # the exit head's own attention, plus tanh(gate) x one over the verified deep states
            p_sh = s_sh.masked_fill(lag < 0, float("-inf")).softmax(-1)
            p_dp = s_dp.masked_fill(lag < depth, float("-inf")).softmax(-1).nan_to_num(0.0)  # t < depth: none verified
            attn = p_sh @ v_sh + torch.tanh(self.deep_gate) * (p_dp @ v_dp)
            return self.logits(self._finish(h, attn))
        if self.keys == "both":  # every shallow key s <= t, and the deep keys of the verified positions
            s_sh = s_sh.masked_fill(lag < 0, float("-inf"))
            s_dp = (s_dp + self.deep_bias).masked_fill(lag < depth, float("-inf"))
            p = torch.cat([s_sh, s_dp], -1).softmax(-1)
            attn = p[..., :T] @ v_sh + p[..., T:] @ v_dp
            return self.logits(self._finish(h, attn))
        s = torch.where(shallow, s_sh, s_dp)
        p = s.masked_fill(lag < 0, float("-inf")).softmax(-1)
        attn = p.masked_fill(~shallow, 0.0) @ v_sh + p.masked_fill(shallow, 0.0) @ v_dp
        return self.logits(self._finish(h, attn))


@torch.no_grad()
def from_warm_start(head: Head, split) -> None:
    """The split's exit head (the shipped warm start) in `head`: its exit layer, final norm and merged
    LM-head rows of its draft vocabulary (`head` built on that vocabulary); a DeepKVHead's deep norm
    and k/v projections copied again from that exit layer (deep values stay zero under `--keys both`)."""
    head.layer.load_state_dict({name: t.float() for name, t in split._head.exit_block().state_dict().items()})
    head.norm.load_state_dict({name: t.float() for name, t in split._head.norm.state_dict().items()})
    head.rows.copy_(lora_merged_weight(split._head.lm_head)[split.draft_vocab].float())
    if isinstance(head, DeepKVHead):
        a = head.layer.self_attn
        head.deep_norm.load_state_dict(head.layer.input_layernorm.state_dict())
        head.deep_k.load_state_dict(a.k_proj.state_dict())
        if head.keys != "both":
            head.deep_v.load_state_dict(a.v_proj.state_dict())


@torch.no_grad()
def evaluate(head: nn.Module, data: list[dict], vocab: torch.Tensor, mode: str) -> float:
    hit = tot = 0
    for d in data:
        lg = head(d["h"], None) if mode in ("A", "R") else head.run(d["h"], d["D"], int(mode[1:]))
        h, n = agreement(lg.argmax(-1), vocab, d)
        hit, tot = hit + h, tot + n
    return hit / max(tot, 1)


def main() -> None:
    ap = probe_arguments(__doc__, 421)
    ap.add_argument("--train-depth", choices=("1", "mix"), default="1")
    ap.add_argument("--deep-layer", type=int, default=None,
                    help="D = hidden_states[j] (the input of decoder layer j); default: the last layer's pre-norm output")
    ap.add_argument("--keys", choices=("replace", "both", "gated"), default="replace",
                    help="verified positions' keys and values: deep in place of shallow, deep beside shallow, or a "
                         "second attention over the deep ones through a zero-initialised gate")
    ap.add_argument("--start", choices=("layer", "warm"), default="layer",
                    help="the exit layer starts as a copy of decoder layer k, or as the shipped warm start's (with its "
                         "draft vocabulary and merged LM-head rows; fine-tuning, so use a fine-tuning --lr)")
    ap.add_argument("--deep-lr", type=float, default=None,
                    help="G's deep norm, k/v projections, bias and gate learn at this rate (default: --lr)")
    ap.add_argument("--reg-weight", type=float, default=1.0, help="R's feature-regression weight")
    ap.add_argument("--heads", default="A,G", help="which heads to train, comma-separated (A, G, R)")
    args = ap.parse_args()
    t_start = time.time()
    split = probe_start(args, OUT)
    k = split.exit_layer
    held, train = probe_text(split, args, TEXT_DIR / "sequences.json")
    tr, he = (teacher(split, seqs, k, args.topk, args.deep_layer) for seqs in (train, held))
    for d in tr + he:
        d["D"] = d["F"] if args.deep_layer is None else d.pop("deep")
    given = split.draft_vocab if args.start == "warm" else None
    vocab, _, _ = draft_vocab(split, tr, len(given) if given is not None else args.draft_vocab, given)
    train_pos = sum(len(d["top1"]) for d in tr)
    held_pos = sum(len(d["top1"]) - 1 - d["start"] for d in he)
    print(f"train {len(tr)} seqs / {train_pos} positions; held-out {len(he)} seqs / {held_pos} scored positions", flush=True)

    order, marks = training_order(len(tr), args.epochs, args.seed, args.stages)
    steps = len(order)
    depths = random.Random(args.seed + 1)
    results: dict[str, list[dict]] = {}
    for name in args.heads.split(","):
        torch.manual_seed(args.seed)
        if name == "G":
            head, modes = DeepKVHead(split, k, vocab, args.keys), ("G1", "G2", "G3")
        else:
            head, modes = Head(split, k, vocab, fuse=False), (name,)
        if args.start == "warm":
            from_warm_start(head, split)
        named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        deep = [p for n, p in named if n.startswith("deep_")]  # G's new parameters, at --deep-lr
        groups = [{"params": [p for n, p in named if not n.startswith("deep_")]}] + (
            [{"params": deep, "lr": args.deep_lr or args.lr}] if deep else [])
        opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
        sched = lr_schedule(opt, "cosine", steps)
        curve = [{"stage": 0, "steps": 0, "train_s": 0.0, **{m: evaluate(head, he, vocab, m) for m in modes}}]
        print(name, curve[-1], flush=True)
        train_s, run_kl, n = 0.0, 0.0, 0
        for step, idx in enumerate(order, start=1):
            t0 = time.time()
            d = tr[idx]
            reg = torch.zeros(())
            if name == "G":
                lg = head.run(d["h"], d["D"], 1 if args.train_depth == "1" else depths.randint(1, 3))
            else:
                state = head.state(d["h"])
                lg = head.logits(state)
                if name == "R":
                    reg = F_.smooth_l1_loss(head.norm(state), head.norm(d["F"]))
            kl = kl_loss(lg, d["local"], d["topk_lp"], d["valid"])
            optimiser_step(kl + args.reg_weight * reg, opt, sched, params)
            train_s += time.time() - t0
            run_kl, n = run_kl + float(kl.detach()), n + 1
            if step in marks:
                row = {"stage": len(curve), "steps": step, "train_s": round(train_s, 1), "kl": round(run_kl / n, 4),
                       **{m: evaluate(head, he, vocab, m) for m in modes}}
                if getattr(head, "keys", None) == "gated":
                    row["gate"] = [round(float(g), 4) for g in torch.tanh(head.deep_gate.detach()).flatten()]
                run_kl, n = 0.0, 0
                curve.append(row)
                print(name, row, flush=True)
        results[name] = curve

    names = [m for name in args.heads.split(",") for m in (("G1", "G2", "G3") if name == "G" else (name,))]
    table = stage_table(names, {m: results[m[0]] for m in names}, args.stages, len(tr))
    L = split.model.config.num_hidden_layers
    meta = {
        "model": split.model_id, "exit_layer": k,
        "deep_state": "pre-norm output of the last decoder layer" if args.deep_layer is None else f"hidden_states[{args.deep_layer}] of {L}",
        "start": "copy of decoder layer k" if args.start == "layer" else "the shipped warm start (exit layer, merged LM-head rows, draft vocabulary)",
        "keys": args.keys, "train_depth": args.train_depth, "reg_weight": args.reg_weight if "R" in args.heads else None, "train_prompts": len(tr), "train_positions": train_pos, "heldout_prompts": len(he),
        "heldout_scored_positions": held_pos, "max_new_tokens": args.max_new_tokens, "draft_vocab": len(vocab),
        "steps": steps, "epochs": args.epochs, "lr": args.lr, "deep_lr": args.deep_lr or args.lr, "topk": args.topk, "schedule": "cosine",
        "batch": "one sequence per step (all its positions)", "teacher": "split.model fp32 (dequantised) forward over each sequence",
        "wall_s": round(time.time() - t_start, 1),
    }
    md = ("# The exit head reading the verifier's deep states of verified positions (issue 13's route)\n\n"
          "A: the exit head (k layers + exit layer), every key and value shallow. G1/G2/G3: the same layer whose keys and "
          "values of verified positions come from the verifier's deep state, on a block's first/second/third draft. "
          "R: A trained to match the verifier's deep state as well.\n\n"
          + "\n".join(table) + "\n\n```json\n" + json.dumps(meta, indent=1) + "\n```\n")
    variant = "".join([f"_layer{args.deep_layer}" if args.deep_layer is not None else "",
                       "_mix" if args.train_depth == "mix" else "", "_both" if args.keys == "both" else "",
                       "_regression" if args.heads == "R" else "",
                       f"_{args.keys}" if args.keys == "gated" else "", "_warm" if args.start == "warm" else "",
                       f"_deep_lr_{args.deep_lr:g}" if args.deep_lr else "", "_A" if args.heads == "A" else ""])
    stem = f"deep_kv_head_{len(tr)}p{variant}"
    (OUT / f"{stem}.md").write_text(md)
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "curves": results}, indent=1))
    print(md, flush=True)


if __name__ == "__main__":
    main()
