"""The model and drafter an offline probe of the exit head scores (benchmarks/agreement_gap.py,
benchmarks/topk_agreement.py, benchmarks/document_seeds_probe.py): the same three options and the
same loading everywhere, and the per-category prompt sets they score."""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from common.core.config import DEFAULT_MODEL, DrafterConfig, ModelSpec
from common.model.split import SplitModel


def add_drafter_args(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter (default: the default drafter, the warm start) and --exit-layer."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--adapter", default=None, help="Adapter directory (default: the default drafter, the warm start).")
    parser.add_argument("--exit-layer", type=int, default=DrafterConfig.exit_layer)


def load_drafter(args: argparse.Namespace) -> SplitModel:
    """The split model of `args.model` at `args.exit_layer`, with `args.adapter` loaded if given,
    on one torch thread (as `dvi warmstart` scores agreement)."""
    torch.set_num_threads(1)
    split = SplitModel.load(ModelSpec(model=args.model, drafter=DrafterConfig(exit_layer=args.exit_layer)))
    if args.adapter:
        split.load_adapter(args.adapter)
    return split


def prompts_by_category(prompts: Sequence, per_category: int) -> dict[str, list]:
    """The first `per_category` prompts of each question category (MT-bench's eight kept apart,
    finer than `spec_bench_task`), categories in order of first appearance."""
    grouped: dict[str, list] = {}
    for prompt in prompts:
        grouped.setdefault(prompt.category, []).append(prompt)
    return {category: chosen[:per_category] for category, chosen in grouped.items()}


def texts_by_category(prompts: Sequence, per_category: int) -> dict[str, list[str]]:
    """The texts of `prompts_by_category`'s prompts."""
    return {category: [p.text for p in chosen] for category, chosen in prompts_by_category(prompts, per_category).items()}
