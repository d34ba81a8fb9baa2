"""The GGUF block kernel of a git revision against the working tree's, on SmolLM2's own matrices.

    python benchmarks/kernel_ab.py [--base REV] [--repeats R] [--rows 1,5]

Builds the C kernel (`common/model/engine/gguf_kernels.py`) from the source at `--base` (default
HEAD) next to this checkout's, then times the `q8` matmul of layer 0's Q4_1 matrices and the
Q8_0 LM head with both libraries, interleaved, one torch thread, the fastest of `--repeats` runs,
at each row count of `--rows`; and checks that both give the same bits. A matrix this small
stays in the cache here, so the times are the kernel's compute (what a verify row adds), not
the weight streaming of a whole forward. Then the same for `causal_attention` over SmolLM2's 30
layers (9 query heads on 3 kv heads of 64, a KV cache of each layer's own) at 64, 256 and 1,024
cached positions. Prints markdown tables; writes nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.model.engine import gguf_kernels  # noqa: E402
from common.model.loading import load_model_and_tokenizer, load_native_weights  # noqa: E402
from dvi.bench.speed import machine_info  # noqa: E402


def library_at(revision: str, folder: Path):
    """The kernel library built from `gguf_kernels.py` as it was at `revision`, with this CPU's flags."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:common/model/engine/gguf_kernels.py"],
                          capture_output=True, text=True, check=True).stdout
    source = text.split('_SOURCE = r"""', 1)[1].split('"""', 1)[0]
    compiler = shutil.which("cc") or shutil.which("gcc")
    flags = [*gguf_kernels._FLAGS, *gguf_kernels._DOT_FLAGS[gguf_kernels.dot_instructions()]]
    target = gguf_kernels._build(compiler, flags, folder, source)
    if target is None:
        raise SystemExit(f"the kernel at {revision} does not build here")
    return gguf_kernels._load(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", default="1,5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not gguf_kernels.available():
        raise SystemExit("the GGUF block kernel does not build on this machine")
    new = gguf_kernels._library()
    with tempfile.TemporaryDirectory() as tmp:
        old = library_at(args.base, Path(tmp))
        model, _ = load_model_and_tokenizer("smollm2-135m-instruct", "float32", "cpu")
        native = load_native_weights("smollm2-135m-instruct", model.config)
        names = [n for n in native if ".layers.0." in n] + ["lm_head"]
        print(f"{machine_info('cpu')['processor']}, dot product: {gguf_kernels.dot_instructions()}; "
              f"base {args.base} against the working tree, fastest of {args.repeats}, 1 thread\n")
        print("| matrix | GGUF type | rows | base ms | working tree ms | ratio | same bits |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name in names:
            blocks = gguf_kernels.GgufBlocks(native[name])
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, blocks.in_features, generator=torch.Generator().manual_seed(rows))
                best, out = {}, {}
                for _ in range(args.repeats):
                    for tag, lib in (("base", old), ("tree", new)):
                        blocks._lib = lib
                        started = time.perf_counter()
                        out[tag] = blocks.q8(x)
                        best[tag] = min(best.get(tag, float("inf")), time.perf_counter() - started)
                print(f"| {name} | {native[name].kind} | {rows} | {best['base'] * 1e3:.3f} | {best['tree'] * 1e3:.3f} | "
                      f"{best['tree'] / best['base']:.3f} | {torch.equal(out['base'], out['tree'])} |")
        attention(old, new, list(map(int, args.rows.split(","))), max(3, args.repeats // 4))


def attention(old, new, row_counts: list[int], repeats: int, layers: int = 30, heads: int = 9, kv_heads: int = 3,
              head_dim: int = 64) -> None:
    """`causal_attention` of both libraries over `layers` caches of random keys and values."""
    print("\n| attention, 30 layers | cached positions | rows | base ms | working tree ms | ratio | same bits |")
    print("|---|---:|---:|---:|---:|---:|---|")
    generator = torch.Generator().manual_seed(0)
    for past in (64, 256, 1024):
        for rows in row_counts:
            keys = [torch.randn(kv_heads, past + rows, head_dim, generator=generator) for _ in range(layers)]
            values = [torch.randn(kv_heads, past + rows, head_dim, generator=generator) for _ in range(layers)]
            q = torch.randn(heads, rows, head_dim, generator=generator)
            best, out = {}, {}
            for _ in range(repeats):
                for tag, lib in (("base", old), ("tree", new)):
                    result = torch.empty(rows, heads * head_dim)
                    started = time.perf_counter()
                    for k, v in zip(keys, values):
                        lib.causal_attention(q.data_ptr(), heads, rows, head_dim, k.data_ptr(), v.data_ptr(), kv_heads,
                                             k.stride(0), past, head_dim ** -0.5, result.data_ptr(), 1)
                    best[tag] = min(best.get(tag, float("inf")), time.perf_counter() - started)
                    out[tag] = result
            print(f"| | {past} | {rows} | {best['base'] * 1e3:.3f} | {best['tree'] * 1e3:.3f} | "
                  f"{best['tree'] / best['base']:.3f} | {torch.equal(out['base'], out['tree'])} |")


if __name__ == "__main__":
    main()
