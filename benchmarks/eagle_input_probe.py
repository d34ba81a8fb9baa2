"""Offline probe of lever 5 of issue 13: does an EAGLE-style input (the verifier's top-layer state of
the previous position) make the exit head agree with the verifier enough to pay?

Contract. On the default split (SmolLM2-135M, exit layer k=4, `SplitModel.load(ModelSpec())`):
  text     the model's own greedy continuations (`greedy_continuations`, fast engine, max_new_tokens
           new tokens) of a stratified subset of dvi/data/warmstart_seeds.jsonl (train) and of
           `load_prompts(question_dev.jsonl, per_task=4)` (held-out, 24 prompts), chat-template encoded;
  teacher  one fp32 forward of `split.model` over each whole sequence: h_k(t) = hidden_states[k] (output
           of the k shallow layers), F(t) = the PRE-norm output of the last decoder layer (a forward hook;
           hidden_states[-1] would be the normed one), and the verifier's argmax and top-32 log-probs;
  heads    A: exit layer = full-rank copy of decoder layer k, input h_k(t), then the frozen final norm and
              the frozen LM-head rows of the draft vocabulary (the 8192 most frequent argmax targets of the
              train text, EOS included) -> logits over the draft vocabulary;
           B: the same plus W_f F(t-1) added to the input (W_f: Linear(H, H), zero-initialised, so B starts
              as A; F(-1) = 0); both trained with identical budgets (same steps, order, lr, schedule);
           C: B's weights, but the query position's input is h_k(t) + W_f o(t-1), o = B's own exit-layer
              output (pre-norm) at t-1, computed with verifier inputs; keys/values of positions < t keep
              their verifier-conditioned inputs. This is exactly the 2nd draft token of a block (its
              predecessor, the 1st draft token, had F); 3rd+ draft tokens would chain further and do worse.
  loss     KL(verifier || head) at every position of the train sequences (prompt included), as
           learner/losses.py: the verifier's top-K restricted to the draft vocabulary and renormalised,
           the head's log-softmax over the draft vocabulary; AdamW lr 1e-3 (the learner's exit-layer lr),
           weight decay 0, grad clip 1.0, cosine to 0, one sequence per step, shuffled, same order for A/B.
  metric   held-out top-1 agreement: head argmax mapped to full ids == the fp32 verifier's argmax, over
           the generated positions (P-1 .. T-2) of the held-out sequences; a verifier top-1 outside the draft
           vocabulary is a miss. Reported before training and after each of `--stages` equal stages.
Output: docs/improve/eagle_probe/eagle_probe[_normed][_<N>p].{md,json} (+ sequences.json, the generated text cache).
`--feature normed` uses f = final_norm(F) (EAGLE's own feature, = hidden_states[-1]) instead of pre-norm F.

Command (one thread, low priority):
  cd /work/main && PYTHONPATH=/work/main nice -n 19 .venv/bin/python benchmarks/eagle_input_probe.py \
      --train-prompts 150 --epochs 4 --stages 4
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from common.core.config import ModelSpec
from common.core.prompts import encode_prompt, load_prompts
from common.decoding.agreement import greedy_continuations
from common.model.split import SplitModel
from learner.warmstart import lr_schedule

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "improve" / "eagle_probe"
SEEDS = ROOT / "dvi" / "data" / "warmstart_seeds.jsonl"
HELDOUT = ROOT / "dvi" / "data" / "spec_bench" / "question_dev.jsonl"


def stratified_seeds(n: int) -> list:
    """Round-robin over the seed file's categories (file order inside each) until n prompts."""
    by_cat: dict[str, list] = defaultdict(list)
    for p in load_prompts(SEEDS):
        by_cat[p.category].append(p)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_cat.values()):
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]) and len(out) < n:
                out.append(by_cat[cat][i])
        i += 1
    return out


def sequences(split, prompts, max_new: int, cache: Path, tag: str) -> list[dict]:
    """Greedy continuations, cached in `cache` (keyed by tag, prompt id and settings)."""
    store = json.loads(cache.read_text()) if cache.is_file() else {}
    out, t0, fresh = [], time.time(), 0
    for p in prompts:
        key = f"{tag}:{p.question_id}:{max_new}"
        if key not in store:
            ids = encode_prompt(split.tokenizer, p.text)
            seqs, starts = greedy_continuations(split, [ids], max_new)
            store[key] = {"ids": seqs[0], "start": starts[0], "category": p.category}
            fresh += len(seqs[0]) - len(ids)
            if fresh and len(store) % 10 == 0:
                cache.write_text(json.dumps(store))
        out.append(store[key])
    cache.write_text(json.dumps(store))
    dt = time.time() - t0
    print(f"[{tag}] {len(out)} sequences, {fresh} new tokens generated in {dt:.0f}s", flush=True)
    return out


@torch.no_grad()
def teacher(split, seqs: list[dict], k: int, topk: int, deep_layer: int | None = None) -> list[dict]:
    """Per sequence: h_k [T,H], F (pre-norm last-layer output) [T,H], argmax [T], top-K ids/log-probs [T,K];
    with `deep_layer` j, also "deep": hidden_states[j] [T,H] of the same forward."""
    model = split.model
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("F", o[0] if isinstance(o, tuple) else o))
    out = []
    t0 = time.time()
    try:
        for s in seqs:
            ids = torch.tensor([s["ids"]])
            res = model(input_ids=ids, output_hidden_states=True)
            logp = torch.log_softmax(res.logits[0].float(), -1)
            lp, ti = logp.topk(topk, -1)
            out.append({"h": res.hidden_states[k][0].float().clone(), "F": captured["F"][0].float().clone(),
                        "top1": ti[:, 0].clone(), "topk_ids": ti, "topk_lp": lp, "start": s["start"]})
            if deep_layer is not None:
                out[-1]["deep"] = res.hidden_states[deep_layer][0].float().clone()
    finally:
        hook.remove()
    print(f"teacher forward over {len(seqs)} sequences ({sum(len(s['ids']) for s in seqs)} tokens) in {time.time() - t0:.0f}s", flush=True)
    return out


class Head(nn.Module):
    """Exit layer (a full-rank copy of a Llama decoder layer, run by hand so C can mix inputs) +
    frozen final norm + frozen LM-head rows of the draft vocabulary; `fuse` adds W_f f(t-1)."""

    def __init__(self, split, k: int, vocab: torch.Tensor, fuse: bool):
        super().__init__()
        model = split.model
        self.layer = copy.deepcopy(model.model.layers[k]).float()
        for p in self.layer.parameters():
            p.requires_grad_(True)
        self.norm = copy.deepcopy(model.model.norm).float().requires_grad_(False)
        self.rows = nn.Parameter(model.lm_head.weight.detach()[vocab].float().clone(), requires_grad=False)
        self.rotary = model.model.rotary_emb
        H = model.config.hidden_size
        self.fuse = nn.Linear(H, H, bias=False) if fuse else None
        self.feature = "prenorm"  # f's form; "normed": the final norm applied (to F and to C's own state o)
        if self.fuse is not None:
            nn.init.zeros_(self.fuse.weight)
        a = self.layer.self_attn
        self.nh, self.nkv, self.hd = model.config.num_attention_heads, model.config.num_key_value_heads, a.head_dim

    def inputs(self, h: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        if self.fuse is None or prev is None:
            return h
        if self.feature == "normed":
            prev = self.norm(prev)
        shifted = torch.cat([torch.zeros_like(prev[:1]), prev[:-1]], 0)  # f(t-1), zeros at t=0
        return h + self.fuse(shifted)

    def _qkv(self, x: torch.Tensor, cos, sin):
        a, T = self.layer.self_attn, x.shape[0]
        y = self.layer.input_layernorm(x)
        q = a.q_proj(y).view(T, self.nh, self.hd).transpose(0, 1)[None]
        kk = a.k_proj(y).view(T, self.nkv, self.hd).transpose(0, 1)[None]
        v = a.v_proj(y).view(T, self.nkv, self.hd).transpose(0, 1)[None]
        q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
        rep = self.nh // self.nkv
        return q[0], kk[0].repeat_interleave(rep, 0), v[0].repeat_interleave(rep, 0)  # [nh, T, hd]

    def _rope(self, x):
        pos = torch.arange(x.shape[0])[None]
        return self.rotary(x[None], pos)

    def _finish(self, x, attn):
        a = self.layer.self_attn
        T = x.shape[0]
        x = x + a.o_proj(attn.transpose(0, 1).reshape(T, -1))
        return x + self.layer.mlp(self.layer.post_attention_layernorm(x))

    def state(self, x: torch.Tensor) -> torch.Tensor:
        """Exit-layer output (pre-norm) of inputs x [T,H], causal."""
        cos, sin = self._rope(x)
        q, kk, v = self._qkv(x, cos, sin)
        attn = F_.scaled_dot_product_attention(q[None], kk[None], v[None], is_causal=True)[0]
        return self._finish(x, attn)

    def state_mixed(self, x_ctx: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        """Output at each t when position t's input is x_q[t] but every s < t keeps x_ctx[s]."""
        cos, sin = self._rope(x_ctx)
        _, k1, v1 = self._qkv(x_ctx, cos, sin)
        q2, k2, v2 = self._qkv(x_q, cos, sin)
        scale = 1.0 / math.sqrt(self.hd)
        s = (q2 @ k1.transpose(-1, -2)) * scale  # [nh, T, T]
        diag = (q2 * k2).sum(-1) * scale  # [nh, T]
        T = x_q.shape[0]
        eye = torch.eye(T, dtype=torch.bool)
        s = torch.where(eye, diag[:, :, None].expand_as(s), s)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        p_off = p.masked_fill(eye, 0.0)
        attn = p_off @ v1 + p.diagonal(dim1=-2, dim2=-1)[..., None] * v2
        return self._finish(x_q, attn)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        return self.norm(state) @ self.rows.T

    def forward(self, h, prev):
        return self.logits(self.state(self.inputs(h, prev)))


def optimiser_step(loss: torch.Tensor, opt, sched, params) -> None:
    """Backward, gradients clipped to norm 1.0, one optimiser and schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def kl_loss(logits, topk_ids_local, topk_lp, valid):
    """KL(p~ || q) up to a constant: p~ = verifier top-K restricted to the draft vocab, renormalised."""
    lp = topk_lp.masked_fill(~valid, float("-inf"))
    p = torch.softmax(lp, -1)
    has = valid.any(-1)
    logq = torch.log_softmax(logits, -1).gather(-1, topk_ids_local.clamp(min=0))
    per = -(p * logq).masked_fill(~valid, 0.0).sum(-1)
    return per[has].mean() if has.any() else logits.sum() * 0


@torch.no_grad()
def evaluate(head: Head, data: list[dict], vocab: torch.Tensor, mode: str) -> float:
    """Held-out top-1 agreement over generated positions (start .. T-2)."""
    hit = tot = 0
    for d in data:
        h, Fv, t1, s = d["h"], d["F"], d["top1"], d["start"]
        if mode == "A" or head.fuse is None:
            lg = head(h, None)
        elif mode == "B":
            lg = head(h, Fv)
        else:  # C
            x1 = head.inputs(h, Fv)
            o = head.state(x1)
            x2 = head.inputs(h, o)
            lg = head.logits(head.state_mixed(x1, x2))
        pred = vocab[lg.argmax(-1)]
        sl = slice(s, len(t1) - 1)
        hit += int((pred[sl] == t1[sl]).sum())
        tot += t1[sl].numel()
    return hit / max(tot, 1)


def probe_arguments(doc: str, train_prompts: int) -> argparse.ArgumentParser:
    """The options every offline head probe shares (text, budget, vocabulary, teacher, seed)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-prompts", type=int, default=train_prompts)
    ap.add_argument("--heldout-per-task", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def probe_start(args, out: Path) -> SplitModel:
    """One torch thread, the seed set, `out` made; the default split loaded."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    return SplitModel.load(ModelSpec())


def probe_text(split, args, cache: Path) -> tuple[list[dict], list[dict]]:
    """(held-out, train) sequences for `probe_arguments`' options, generated once into `cache`."""
    held = sequences(split, load_prompts(HELDOUT, per_task=args.heldout_per_task), args.max_new_tokens, cache, "heldout")
    train = sequences(split, stratified_seeds(args.train_prompts), args.max_new_tokens, cache, "train")
    return held, train


def draft_vocab(split, tr: list[dict], size: int, given: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(the `size` most frequent verifier argmaxes of the train text, EOS included, padded with the
    lowest unused ids, sorted, or the sorted ids `given`; full id -> draft-vocabulary index, -1
    outside it; how many distinct argmaxes the train text has). Sets each train sequence's "local"
    (its top-K ids as draft indices) and "valid" (those inside the draft vocabulary)."""
    counts = Counter()
    for d in tr:
        counts.update(d["top1"].tolist())
    vocab_ids = set(sorted(split.eos_token_ids)) if given is None else set(given.tolist())
    for tok, _ in counts.most_common():
        if len(vocab_ids) >= size:
            break
        vocab_ids.add(tok)
    if len(vocab_ids) < size:  # fewer distinct targets than the size: pad with lowest unused ids
        for tok in range(split.vocab_size):
            if len(vocab_ids) >= size:
                break
            vocab_ids.add(tok)
    vocab = torch.tensor(sorted(vocab_ids))
    lookup = torch.full((split.vocab_size,), -1, dtype=torch.long)
    lookup[vocab] = torch.arange(len(vocab))
    for d in tr:
        d["local"] = lookup[d["topk_ids"]]
        d["valid"] = d["local"] >= 0
    return vocab, lookup, len(counts)


def stage_table(names: list[str], curves: dict[str, list[dict]], stages: int, sequences: int) -> list[str]:
    """Markdown rows: per stage, its steps, epochs (steps / `sequences`) and each name's agreement, read
    from `curves[name][stage][name]` (stage 0 is before training)."""
    table = ["| stage | steps | epochs | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for i in range(stages + 1):
        steps_i = curves[names[0]][i]["steps"]
        table.append(f"| {i} | {steps_i} | {steps_i / sequences:.2f} | " + " | ".join(f"{curves[m][i][m]:.3f}" for m in names) + " |")
    return table


def training_order(sequences: int, epochs: float, seed: int, stages: int) -> tuple[list[int], set[int]]:
    """(the sequence index of every step: shuffled epochs, cut at epochs * sequences steps; the
    steps after which each of `stages` equal stages ends)."""
    steps = int(round(epochs * sequences))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps:
        perm = list(range(sequences))
        rng.shuffle(perm)
        order += perm
    return order[:steps], {int(round(steps * (i + 1) / stages)) for i in range(stages)}


def main() -> None:
    ap = probe_arguments(__doc__, 150)
    ap.add_argument("--feature", choices=("prenorm", "normed"), default="prenorm",
                    help="f = the last layer's pre-norm output, or it through the (frozen) final norm (EAGLE's feature)")
    ap.add_argument("--gen-only", action="store_true", help="generate (and cache) the text, then stop")
    args = ap.parse_args()
    t_start = time.time()
    split = probe_start(args, OUT)
    k = split.exit_layer
    print(f"model {split.model_id}, k={k}, engine={split.engine}, weights={split.weights}", flush=True)
    held, train = probe_text(split, args, OUT / "sequences.json")
    if args.gen_only:
        return

    tr = teacher(split, train, k, args.topk)
    he = teacher(split, held, k, args.topk)

    vocab, lookup, distinct = draft_vocab(split, tr, args.draft_vocab)
    held_cov = sum(int((lookup[d["top1"][d["start"]:-1]] >= 0).sum()) for d in he) / sum(len(d["top1"]) - 1 - d["start"] for d in he)
    train_pos = sum(len(d["top1"]) for d in tr)
    held_pos = sum(len(d["top1"]) - 1 - d["start"] for d in he)
    print(f"train: {len(tr)} seqs, {train_pos} positions; held-out: {len(he)} seqs, {held_pos} scored positions; "
          f"draft vocab {len(vocab)} ({distinct} distinct train targets), held-out top-1 coverage {held_cov:.3f}", flush=True)

    order, marks = training_order(len(tr), args.epochs, args.seed, args.stages)
    steps = len(order)

    results = {}
    base = Head(split, k, vocab, fuse=False)
    for name in ("A", "B"):
        torch.manual_seed(args.seed)
        head = Head(split, k, vocab, fuse=(name == "B"))
        head.feature = args.feature
        head.layer.load_state_dict(base.layer.state_dict())  # same initialisation
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        sched = lr_schedule(opt, "cosine", steps)
        curve = [{"stage": 0, "steps": 0, "train_s": 0.0, "A" if name == "A" else "B": evaluate(head, he, vocab, name)}]
        if name == "B":
            curve[0]["C"] = evaluate(head, he, vocab, "C")
        print(name, curve[-1], flush=True)
        train_s, run_loss, n_loss = 0.0, 0.0, 0
        for step, idx in enumerate(order, start=1):
            t0 = time.time()
            d = tr[idx]
            lg = head(d["h"], d["F"] if name == "B" else None)
            loss = kl_loss(lg, d["local"], d["topk_lp"], d["valid"])
            optimiser_step(loss, opt, sched, params)
            train_s += time.time() - t0
            run_loss += float(loss.detach())
            n_loss += 1
            if step in marks:
                row = {"stage": len(curve), "steps": step, "train_s": round(train_s, 1), "loss": round(run_loss / n_loss, 4),
                       name: evaluate(head, he, vocab, name)}
                if name == "B":
                    row["C"] = evaluate(head, he, vocab, "C")
                    row["W_f_norm"] = round(float(head.fuse.weight.norm()), 4)
                run_loss, n_loss = 0.0, 0
                curve.append(row)
                print(name, row, flush=True)
        results[name] = curve

    table = ["| stage | steps | epochs | A (h_k) | B (h_k + W_f F(t-1)) | C (B, own state o(t-1)) | train s A / B |",
             "|---|---|---|---|---|---|---|"]
    for ra, rb in zip(results["A"], results["B"]):
        table.append(f"| {ra['stage']} | {ra['steps']} | {ra['steps'] / len(tr):.2f} | {ra['A']:.3f} | {rb['B']:.3f} | {rb['C']:.3f} "
                     f"| {ra['train_s']:.0f} / {rb['train_s']:.0f} |")
    meta = {
        "model": split.model_id, "exit_layer": k, "train_prompts": len(tr), "train_positions": train_pos,
        "heldout_prompts": len(he), "heldout_scored_positions": held_pos, "max_new_tokens": args.max_new_tokens,
        "draft_vocab": len(vocab), "heldout_top1_in_draft_vocab": round(held_cov, 4), "steps": steps, "epochs": args.epochs,
        "lr": args.lr, "schedule": "cosine", "batch": "one sequence per step (all its positions)", "topk": args.topk,
        "f": ("pre-norm output of the last decoder layer" if args.feature == "prenorm" else
              "the final norm of the last decoder layer's output (= hidden_states[-1], EAGLE's feature)")
             + " of the fp32 verifier (split.model) at t-1; zeros at t=0; C uses the head's own exit-layer output, same form",
        "feature": args.feature,
        "lm_head_and_norm": "frozen (both heads)", "teacher": "split.model fp32 (dequantised) forward over each sequence",
        "text": "greedy continuations by the split's fast engine (native weights)",
        "wall_s": round(time.time() - t_start, 1),
    }
    md = f"# EAGLE-input probe (issue 13, lever 5), f = {args.feature}\n\n" + "\n".join(table) + "\n\n```json\n" + json.dumps(meta, indent=1) + "\n```\n"
    stem = "eagle_probe" if args.feature == "prenorm" else f"eagle_probe_{args.feature}"
    if len(tr) != 150:
        stem += f"_{len(tr)}p"
    (OUT / f"{stem}.md").write_text(md)
    (OUT / f"{stem}.json").write_text(json.dumps({"meta": meta, "curves": results}, indent=1))
    print(md, flush=True)


if __name__ == "__main__":
    main()
