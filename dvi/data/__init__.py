"""Data that ships inside the package: the demo's default workload.

`SPEC_BENCH_DEV` is the Spec-Bench development split (240 prompts, Apache-2.0; see
`spec_bench/README.md` beside this file for its source and licence).
"""

from pathlib import Path

SPEC_BENCH_DEV = Path(__file__).resolve().parent / "spec_bench" / "question_dev.jsonl"
