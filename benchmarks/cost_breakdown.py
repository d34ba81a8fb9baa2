"""Where a DVI block's time goes: milliseconds per piece of the split model, batch 1.

    python benchmarks/cost_breakdown.py [--model M] [--exit-layer K] [--draft-vocab-size V']
                                        [--context N] [--threads T] [--repeats R] [--no-hf]

Columns, timed side by side (each piece runs in every column before the next piece, so a busy
machine slows all columns alike): `native` (the fast engine on the model file's own precision:
a GGUF's Q4_1/Q8_0 blocks, kernels chosen by the engine's probe), `fp32` (the fast engine on the
dequantised fp32 weights) and `hf` (the HF decoder layers, fp32). With a KV cache of --context
positions it times the shallow pass of one token (layers [0, k)), one draft (exit layer + the
drafter's LM head over the draft vocabulary), the full forward of a block of T rows (shallow +
deep + LM head) for T = 1..8, 11 and 16, the LM head alone, and one HF forward of one token
(what `generate` runs per token). Then it prints the cost of a drafted token and of a 5-row
block relative to a one-row forward, the weight bytes a one-row forward streams in each
column, the kernels chosen, and the split's own timing of a draft step and of one more verify
row at this context (`SplitModel._time_costs`, which adaptive gamma and arbitration use). Writes
nothing. A model without a native form (safetensors) has no `native` column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.core.config import DEFAULT_MODEL, DrafterConfig, ModelSpec  # noqa: E402
from common.model.split import SplitModel, crop_cache  # noqa: E402
from common.model.engine.packed_linear import cpu_kernels  # noqa: E402

BLOCK_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 11, 16)


def mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def pieces(split: SplitModel, context: int) -> dict:
    """name -> a zero-argument function running that piece of `split` once (restoring its caches),
    after a prefill of `context` positions."""
    n = context
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(5000, split.vocab_size), (1, n), generator=gen)
    cache, exit_cache = split.new_cache(n + 32), split.new_exit_cache(n + 32)
    pos = torch.arange(n)[None]
    with torch.inference_mode():
        h = split.shallow(ids, pos, cache)
        split.deep(h, pos, cache, logits=False)
        split.draft(h, pos, exit_cache)
        one, at = torch.tensor([[42]]), torch.tensor([[n]])
        hk = split.shallow(one, at, cache)
        crop_cache(cache, n)
        hf_cache = split.model(input_ids=ids, use_cache=True).past_key_values

    def undo(f, c):
        def run():
            with torch.inference_mode():
                f()
            crop_cache(c, n)
        return run

    out = {
        f"shallow, 1 token ({split.exit_layer} layers)": undo(lambda: split.shallow(one, at, cache), cache),
        f"draft (exit layer + LM head over {split.draft_vocab.shape[0]} tokens)": undo(
            lambda: split.draft(hk, at, exit_cache), exit_cache),
        "LM head alone, 1 row": undo(
            lambda: split._fast.lm_head(hk[0]) if split._fast is not None else split.model.lm_head(hk[0]), cache),
    }
    for rows in BLOCK_ROWS:
        block = torch.randint(100, min(5000, split.vocab_size), (1, rows), generator=gen)
        block_pos = torch.arange(n, n + rows)[None]
        out[f"full forward, {rows} rows"] = undo(
            lambda block=block, block_pos=block_pos: split.deep(split.shallow(block, block_pos, cache), block_pos, cache), cache)
    # crop_cache, not DynamicCache.crop: transformers 5.24 made crop's argument a count to remove
    out["HF model forward, 1 token"] = undo(
        lambda: split.model(input_ids=one, past_key_values=hf_cache, use_cache=True), hf_cache)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--exit-layer", type=int, default=DrafterConfig.exit_layer)
    parser.add_argument("--draft-vocab-size", type=int, default=DrafterConfig.draft_vocab_size)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-hf", action="store_true", help="Leave out the HF-layers column (the slowest to time).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drafter = DrafterConfig(exit_layer=args.exit_layer, draft_vocab_size=args.draft_vocab_size)
    native = SplitModel.load(ModelSpec(model=args.model, drafter=drafter, engine="fast", weights="native"))
    splits = {"native": native} if native.weights == "native" else {}
    splits["fp32"] = SplitModel(native.model, native.tokenizer, drafter, args.model, engine="fast")
    if not args.no_hf:
        splits["hf"] = SplitModel(native.model, native.tokenizer, drafter, args.model, engine="hf")
    runs = {column: pieces(split, args.context) for column, split in splits.items()}
    names = list(runs["fp32"])
    columns: dict[str, dict[str, float]] = {column: {} for column in runs}
    for name in names:  # piece by piece, every column in turn
        for column in runs:
            columns[column][name] = mean_ms(runs[column][name], args.repeats)
    head = " | ".join(f"{c} ms" for c in columns)
    print(f"| piece ({args.model}, k={args.exit_layer}, context {args.context}, {args.threads} thread(s)) | {head} |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{columns[c][name]:.2f}" for c in columns) + " |")
    for column, times in columns.items():
        drafted = times[names[0]] + times[names[1]]
        full = times["full forward, 1 rows"]
        line = (f"\n{column}: one drafted token (shallow + draft) = {drafted:.1f} ms = {drafted / full:.0%} of a one-row "
                f"forward ({full:.1f} ms); a 5-row block = {times['full forward, 5 rows'] / full:.2f}x one row")
        fast = splits[column]._fast
        if fast is not None:
            mb = fast.weight_bytes(1) / 1e6
            line += f"; weights streamed per one-row forward: {mb:.1f} MB ({mb / full:.1f} GB/s at that speed)"
        print(line)
    print(f"\nfast engine's dense CPU linear kernels here: {cpu_kernels()}")
    if "native" in splits:
        print(f"native kernels per role (one row, block): {native.native_kernels}")
        file_mb = sum(m.shape[0] * m.shape[1] * m.bytes_per_weight for m in native.native.values()) / 1e6
        print(f"the GGUF file's quantised matrices: {file_mb:.1f} MB (what llama.cpp streams per token)")
        draft_cost, row_cost, probe_cost = native._time_costs(context=args.context)
        print(f"the split's own timing at this context (the decoder times it at {' and '.join(map(str, SplitModel.COST_CONTEXTS))} "
              f"tokens and interpolates by length): draft step "
              f"{draft_cost:.3f}, one more verify row {row_cost:.3f}, the exit head alone (a probe) {probe_cost:.3f} "
              f"of a one-row verifier pass")


if __name__ == "__main__":
    main()
