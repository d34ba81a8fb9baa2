"""Where a DVI block's time goes: milliseconds per piece of the split model, batch 1.

    python benchmarks/cost_breakdown.py [--model M] [--exit-layer K] [--context N] [--threads T]

Times (mean over --repeats, after one warm-up, KV cache of --context positions):
shallow pass of one token (layers [0, k)), one draft (exit layer + the drafter's LM head), the
deep pass over 1 and over gamma+1 positions (layers [k, L) + LM head), the LM head alone, and one
full HF forward of one token. Prints a table and the cost of one drafted token relative to a full
forward. Writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.config import DEFAULT_MODEL, DrafterConfig, ModelSpec  # noqa: E402
from common.model_split import SplitModel, crop_cache  # noqa: E402


def mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--exit-layer", type=int, default=DrafterConfig.exit_layer)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = SplitModel.load(ModelSpec(model=args.model, drafter=DrafterConfig(exit_layer=args.exit_layer)))
    n = args.context
    ids = torch.randint(100, min(5000, split.vocab_size), (1, n))
    with torch.inference_mode():
        cache, exit_cache = split.new_cache(), split.new_exit_cache()
        pos = torch.arange(n)[None]
        h = split.shallow(ids, pos, cache)
        split.deep(h, pos, cache, logits=False)
        split.draft(h, pos, exit_cache)
        one, at = torch.tensor([[42]]), torch.tensor([[n]])
        hk = split.shallow(one, at, cache)
        crop_cache(cache, n)
        block = torch.cat([hk] * (args.gamma + 1), dim=1)
        block_pos = torch.arange(n, n + args.gamma + 1)[None]
        hf_cache = split.new_cache()
        split.model(input_ids=ids, past_key_values=hf_cache, use_cache=True)

        def undo(f, c):
            def run():
                f()
                crop_cache(c, n)
            return run

        rows = {
            f"shallow, 1 token ({split.exit_layer} layers)": undo(lambda: split.shallow(one, at, cache), cache),
            "draft (exit layer + LM head)": undo(lambda: split.draft(hk, at, exit_cache), exit_cache),
            f"deep, 1 position ({split.num_layers - split.exit_layer} layers + LM head)": undo(lambda: split.deep(hk, at, cache), cache),
            f"deep, {args.gamma + 1} positions": undo(lambda: split.deep(block, block_pos, cache), cache),
            "LM head alone": lambda: split.model.lm_head(hk),
            "HF full forward, 1 token": undo(lambda: split.model(input_ids=one, past_key_values=hf_cache, use_cache=True), hf_cache),
        }
        times = {name: mean_ms(fn, args.repeats) for name, fn in rows.items()}
    print(f"| piece ({args.model}, k={split.exit_layer}, {args.threads} thread(s)) | ms |\n|---|---:|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} |")
    names = list(times)
    drafted = times[names[0]] + times[names[1]]
    print(f"\none drafted token (shallow + draft) = {drafted:.1f} ms = {drafted / times[names[-1]]:.0%} of a full forward")


if __name__ == "__main__":
    main()
