"""This machine's memory bandwidth as torch sees it: the ceiling of batch-1 decoding on a CPU.

    python benchmarks/memory_bandwidth.py [--gib 1.0] [--threads 1,2] [--repeats 5]

Decoding one sequence streams every weight once per forward, so tokens/s can be at most
bandwidth / bytes of weights per token. For each thread count it times, best of --repeats, over a
buffer much larger than the caches: a read (`sum`, reads the buffer once), and a copy
(`dst.copy_(src)`, reads it once and writes it once: counted as 2x its size). Prints GB/s (1e9);
the first of the --repeats + 1 calls warms the buffers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.model.engine.packed_linear import best_seconds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = int(args.gib * 2**30 / 4)
    src, dst = torch.rand(n), torch.empty(n)
    size = n * 4
    print("| threads | read (sum) GB/s | copy (read + write) GB/s |\n|---:|---:|---:|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        read = size / best_seconds(lambda: src.sum(), args.repeats + 1) / 1e9
        copy = 2 * size / best_seconds(lambda: dst.copy_(src), args.repeats + 1) / 1e9
        print(f"| {threads} | {read:.1f} | {copy:.1f} |")


if __name__ == "__main__":
    main()
