"""Where a DVI block's time goes: milliseconds per piece of the split model, batch 1.

    python benchmarks/cost_breakdown.py [--model M] [--exit-layer K] [--draft-vocab-size V']
                                        [--context N] [--threads T] [--repeats R]

For each engine (fast: packed weights + static KV cache; hf: the HF decoder layers) it times, with
a KV cache of --context positions: the shallow pass of one token (layers [0, k)), one draft (exit
layer + the drafter's LM head over the draft vocabulary), the full forward of a block of T rows
(shallow + deep + LM head) for T = 1..8, 11 and 16, the LM head alone, and one HF forward of one
token (what `generate` runs per token). It prints a table and the cost of one drafted token
relative to a full forward, side by side in one run. Writes nothing.
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
from common.packed_linear import cpu_kernels  # noqa: E402

BLOCK_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16)


def mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def piece_times(split: SplitModel, context: int, repeats: int) -> dict[str, float]:
    """Milliseconds of each piece of `split` after a prefill of `context` positions."""
    n = context
    ids = torch.randint(100, min(5000, split.vocab_size), (1, n))
    with torch.inference_mode():
        cache, exit_cache = split.new_cache(n + 32), split.new_exit_cache(n + 32)
        pos = torch.arange(n)[None]
        h = split.shallow(ids, pos, cache)
        split.deep(h, pos, cache, logits=False)
        split.draft(h, pos, exit_cache)
        one, at = torch.tensor([[42]]), torch.tensor([[n]])
        hk = split.shallow(one, at, cache)
        crop_cache(cache, n)

        def undo(f, c):
            def run():
                f()
                crop_cache(c, n)
            return run

        times = {
            f"shallow, 1 token ({split.exit_layer} layers)": mean_ms(undo(lambda: split.shallow(one, at, cache), cache), repeats),
            f"draft (exit layer + LM head over {split.draft_vocab.shape[0]} tokens)": mean_ms(
                undo(lambda: split.draft(hk, at, exit_cache), exit_cache), repeats),
            "LM head alone, 1 row (HF module)": mean_ms(lambda: split.model.lm_head(hk[0]), repeats),
        }
        for rows in BLOCK_ROWS:
            block = torch.randint(100, min(5000, split.vocab_size), (1, rows))
            block_pos = torch.arange(n, n + rows)[None]
            times[f"full forward, {rows} rows"] = mean_ms(
                undo(lambda: split.deep(split.shallow(block, block_pos, cache), block_pos, cache), cache), repeats)
        hf_cache = split.model(input_ids=ids, use_cache=True).past_key_values
        # crop_cache, not DynamicCache.crop: transformers 5.24 made crop's argument a count to remove
        times["HF model forward, 1 token"] = mean_ms(
            undo(lambda: split.model(input_ids=one, past_key_values=hf_cache, use_cache=True), hf_cache), repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--exit-layer", type=int, default=DrafterConfig.exit_layer)
    parser.add_argument("--draft-vocab-size", type=int, default=DrafterConfig.draft_vocab_size)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drafter = DrafterConfig(exit_layer=args.exit_layer, draft_vocab_size=args.draft_vocab_size)
    fast = SplitModel.load(ModelSpec(model=args.model, drafter=drafter, engine="fast"))
    hf = SplitModel(fast.model, fast.tokenizer, drafter, args.model, engine="hf")
    columns = {engine: piece_times(split, args.context, args.repeats) for engine, split in (("fast", fast), ("hf", hf))}
    print(f"| piece ({args.model}, k={args.exit_layer}, context {args.context}, {args.threads} thread(s)) "
          f"| fast engine ms | HF layers ms |\n|---|---:|---:|")
    for name in columns["fast"]:
        print(f"| {name} | {columns['fast'][name]:.2f} | {columns['hf'][name]:.2f} |")
    for engine, times in columns.items():
        names = list(times)
        drafted = times[names[0]] + times[names[1]]
        full = times["full forward, 1 rows"]
        print(f"\n{engine}: one drafted token (shallow + draft) = {drafted:.1f} ms = {drafted / full:.0%} of a one-row "
              f"forward ({full:.1f} ms); HF's own forward of one token: {times['HF model forward, 1 token']:.1f} ms")
    print(f"\nfast engine's CPU linear kernels here: {cpu_kernels()}")


if __name__ == "__main__":
    main()
