"""The GGUF block kernel of a git revision against the working tree's, on SmolLM2's own matrices.

    python benchmarks/kernel_ab.py [--base REV] [--repeats R] [--rows 1,5]

Builds the C kernel (`common/model/engine/gguf_kernels.py`) from the source at `--base` (default
HEAD) next to this checkout's, then times the `q8` matmul of layer 0's Q4_1 matrices and the
Q8_0 LM head with both libraries, interleaved, one torch thread, the fastest of `--repeats` runs,
at each row count of `--rows`; and checks that both give the same bits. A matrix this small
stays in the cache here, so the times are the kernel's compute (what a verify row adds), not
the weight streaming of a whole forward. Prints a markdown table; writes nothing.
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
    current, gguf_kernels._SOURCE = gguf_kernels._SOURCE, source
    try:
        target = gguf_kernels._build(compiler, flags, folder)
    finally:
        gguf_kernels._SOURCE = current
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


if __name__ == "__main__":
    main()
