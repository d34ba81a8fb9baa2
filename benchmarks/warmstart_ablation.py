"""Ablation of the drafter's levers by held-out agreement, on a cached `dvi warmstart` corpus.

    python benchmarks/warmstart_ablation.py RUN [RUN ...]

Each RUN is comma-separated key=value changes to the baseline (or "default"): n (corpus
generations used), temp (the corpus's decoding temperature, default 0), epochs, bt (batch
positions), hlr / llr (head / exit-layer lr), init (the layer the exit layer is copied from),
full (1 full rank, 0 LoRA), rank (head LoRA rank; alpha = 2 * rank), prompt (0 drops the prompt positions' targets). Prints one JSON line per run: the
untrained and trained held-out agreement (24 held-out Spec-Bench prompts, 64 greedy tokens,
common/decoding/agreement.py; targets cached in $DVI_CACHE/warmstart/heldout24.safetensors). Needs the
corpus `dvi warmstart` cached for SmolLM2-135M at exit layer 4 (generates what is missing).
"""

import json
import sys
import time
from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file

from common.decoding.agreement import AgreementTargets, greedy_targets
from common.core.config import DrafterConfig, ModelSpec
from common.model.split import SplitModel
from common.model.loading import cache_dir
from common.core.prompts import encode_prompt, load_prompts
from dvi.bench.learning import interleave_categories, split_train_eval
from dvi.commands.warmstart import SEEDS
from dvi.data import SPEC_BENCH_DEV
from learner.warmstart import WarmStartConfig, generate_corpus, train_warm_start


def held_out(split: SplitModel, path) -> list[AgreementTargets]:
    if not path.is_file():
        held = split_train_eval(load_prompts(SPEC_BENCH_DEV))[1][:24]
        targets = greedy_targets(split, [encode_prompt(split.tokenizer, p.text) for p in held], 64)
        tensors = {}
        for i, t in enumerate(targets):
            tensors.update({f"h{i}": t.hidden.float(), f"t{i}": t.top1, f"s{i}": torch.tensor([t.start])})
        save_file(tensors, str(path))
    d = load_file(str(path))
    return [AgreementTargets(d[f"h{i}"], d[f"t{i}"], int(d[f"s{i}"])) for i in range(len(d) // 3)]


def without_prompt(t):
    keep = t.verified_position >= t.prompt_length - 1
    return replace(t, verified_position=t.verified_position[keep], verified_topk_ids=t.verified_topk_ids[keep],
                   verified_topk_logprobs=t.verified_topk_logprobs[keep])


def seed_corpus(base: SplitModel, root, temperature: float, n: int) -> list:
    """The first n generations of the command's corpus at this temperature, in its order, from its
    cache (generating what is missing)."""
    seeds = interleave_categories(load_prompts(SEEDS))[:n]
    corpus, _ = generate_corpus(base, [encode_prompt(base.tokenizer, p.text) for p in seeds],
                                WarmStartConfig(temperature=temperature),
                                root / f"{base.fingerprint}-k{base.exit_layer}" / "corpus")
    return corpus


def main(runs: list[str]) -> None:
    torch.set_num_threads(1)
    base = SplitModel.load(ModelSpec(warm_start=False))
    root = cache_dir() / "warmstart"
    targets = held_out(base, root / "heldout24.safetensors")
    for run in runs:
        kv = dict(x.split("=") for x in run.split(",")) if run != "default" else {}
        n = int(kv.pop("n", 1_000_000))
        part = seed_corpus(base, root, float(kv.pop("temp", 0)), n)
        if kv.pop("prompt", "1") == "0":
            part = [without_prompt(t) for t in part]
        rank = int(kv.pop("rank", 16))
        drafter = DrafterConfig(exit_init_layer=int(kv.pop("init")) if "init" in kv else None,
                                full_rank_exit_layer=kv.pop("full", "1") == "1", lora_rank=rank, lora_alpha=2 * rank)
        cfg = WarmStartConfig(epochs=float(kv.pop("epochs", 2)), chunks=1)
        cfg = replace(cfg, learner=replace(cfg.learner, head_lr=float(kv.pop("hlr", cfg.learner.head_lr)),
                                           lora_lr=float(kv.pop("llr", cfg.learner.lora_lr)),
                                           batch_tokens=int(kv.pop("bt", cfg.learner.batch_tokens))))
        if kv:
            raise SystemExit(f"unknown keys {sorted(kv)}")
        split = SplitModel(base.model, base.tokenizer, drafter, "smollm2-135m-instruct")
        started = time.time()
        learner, points = train_warm_start(split, part, targets, cfg)
        print(json.dumps({"run": run, "trajectories": len(part), "steps": learner.step, "seconds": round(time.time() - started),
                          "untrained": round(points[0].agreement, 4), "trained": round(points[-1].agreement, 4)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
