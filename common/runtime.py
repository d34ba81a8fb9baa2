"""What every service process (generation actor, learner) sets up the same way."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """No weight-loading progress bars or hub retry chatter on the user's terminal (CLI and actors)."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a hard dependency; this only guards odd installs
        pass


def resolve_device(requested: str) -> str:
    """`auto` -> cuda:0 when this process sees a GPU, else cpu; anything else unchanged.

    Under Ray, CUDA_VISIBLE_DEVICES shows a process only the GPU it was granted, so `auto` means
    "the GPU Ray gave me, if any"."""
    if requested != "auto":
        return requested
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def make_observers(client, namespace: str, metrics: bool, telemetry: bool):
    """(MetricsRecorder or None, Telemetry or None) for a service process; imports only what is on."""
    recorder = sink = None
    if metrics:
        from common.observe.metrics import MetricsRecorder

        recorder = MetricsRecorder()
    if telemetry:
        from common.transport.redis.telemetry import Telemetry

        sink = Telemetry(client, namespace)
    return recorder, sink


def start_service_process(model_spec, torch_threads: int, redis_url: str):
    """The common start of a service process: CPU threads, quiet libraries, the split model on the
    device this process was given, and a Redis client that connects on first use (a service
    process must start while Redis is away: its commands retry, then raise ServiceError, which
    actors and the learner wait out). Returns (split, client)."""
    from dataclasses import replace

    import torch

    from common.model.split import SplitModel
    from common.transport.redis.client import connect

    torch.set_num_threads(max(1, torch_threads))
    quiet_libraries()
    split = SplitModel.load(replace(model_spec, device=resolve_device(model_spec.device)))
    return split, connect(redis_url, ping=False)
