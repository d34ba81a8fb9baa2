"""Worker processes that each hold their own copy of the model, so corpus work uses every core.

On a CPU, decoding one sequence per process scales with cores where more torch threads on one
sequence do not. `model_pool(spec, workers)` is a process pool (spawn) whose workers each load
`spec` once, with one torch thread and without the warm start (corpus work never reads the
drafter: it drafts from the context only); a task submitted to it reads that copy with
`worker_split()`. Tasks must be module-level functions of picklable arguments.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import torch

from common.core.config import ModelSpec
from common.model.split import SplitModel

_split: SplitModel | None = None


def _start(spec: ModelSpec) -> None:
    global _split
    torch.set_num_threads(1)
    _split = SplitModel.load(spec)


def worker_split() -> SplitModel:
    """This worker's model (only inside a task run by `model_pool`'s workers)."""
    if _split is None:
        raise RuntimeError("worker_split() is only available inside a model_pool worker")
    return _split


def model_pool(spec: ModelSpec, workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` (>= 1) processes, each with its own copy of `spec`'s model."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start, initargs=(replace(spec, warm_start=False),))
