"""The learner as a service: the Ray shell around `learner.loop.LearnerLoop` over Redis.

The learning logic (ingest, dedupe, staleness, step policy, publish cadence, checkpoint-then-ack)
lives in `learner/loop.py`, the same code `dvi train-local` runs in one process. This module only
wires it to Redis (`common.transport.TrajectoryStream`, `common.weights.WeightStore` plus the
namespace's publish log, which `dvi/driver.py` reads) and makes it a Ray actor.

`LearnerService` is the Ray actor (`max_restarts`, default 10): it builds the loop and runs it on a
thread from `__init__`, so a restarted actor resumes by itself; a loop that fails (Redis gone for
longer than the retries) ends the process so Ray restarts it from the checkpoint; `drain` asks the
thread to finish the stream, publish a last version and checkpoint. It adds no math.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from common.config import ModelSpec
from common.errors import ServiceError
from common.transport import TrajectoryStream, TransportConfig
from common.weights import WeightStore
from learner.config import LearnerConfig
from learner.loop import LearnerLoop, LearnerLoopConfig

log = logging.getLogger(__name__)

__all__ = ["LearnerLoop", "LearnerLoopConfig", "LearnerService", "LearnerSettings", "PublishLoggingStore",
           "create_learner_actor", "learner_placement", "publish_log_key"]


def publish_log_key(namespace: str) -> str:
    """Redis list of JSON {version, step, t, learner_id}: one per weight version this service published."""
    return f"{namespace}:weights:log"


class PublishLoggingStore:
    """A `learner.loop.WeightPublisher`: the Redis `WeightStore`, plus one entry per published
    version on the namespace's publish log (`publish_log_key`)."""

    def __init__(self, store: WeightStore, client: redis.Redis) -> None:
        self.store = store
        self.client = client

    def publish(self, tensors: dict, version: int, learner_id: str, metadata: dict[str, str]) -> Any:
        record = self.store.publish(tensors, version, learner_id, metadata)
        entry = {"version": version, "step": int(metadata.get("step", -1)), "t": time.time(), "learner_id": learner_id}
        self.client.rpush(publish_log_key(self.store.namespace), json.dumps(entry))
        return record

    def latest_version(self) -> int | None:
        return self.store.latest_version()

    def fetch(self, version: int | None = None) -> Any:
        return self.store.fetch(version)


# ============================================================================================ Ray


@dataclass(frozen=True)
class LearnerSettings:
    """Everything the learner actor needs to build itself; picklable."""

    model: ModelSpec
    """Base model and drafter shape (must match the generators'); device "auto" -> cuda:0 if Ray gave a GPU."""
    redis_url: str
    """Where the stream and the weight store live."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Stream settings; its namespace is also the weight store's and telemetry's."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimiser, schedule, replay and staleness."""
    loop: LearnerLoopConfig = field(default_factory=LearnerLoopConfig)
    """Reading, publishing and checkpointing."""
    secret: bytes | None = None
    """HMAC secret weight records are signed with."""
    torch_threads: int = 1
    """Intra-op CPU threads."""
    metrics: bool = True
    """Record catalogue metrics."""
    telemetry: bool = True
    """Publish snapshots and events for `dvi monitor`."""


class LearnerService:
    """Ray-side shell: builds the Learner and its loop, runs the loop on a thread from `__init__`."""

    def __init__(self, settings: LearnerSettings) -> None:
        from common.runtime import make_observers, start_service_process
        from learner.learner import Learner

        self.settings = settings
        self.started_at = time.time()
        split, client = start_service_process(settings.model, settings.torch_threads, settings.redis_url)
        learner = Learner(split, settings.learner, learner_id=settings.loop.learner_id)
        ns = settings.transport.namespace
        metrics, telemetry = make_observers(client, ns, settings.metrics, settings.telemetry)
        self.loop = LearnerLoop(
            learner, TrajectoryStream(client, settings.transport),
            PublishLoggingStore(WeightStore(client, ns, settings.secret), client),
            settings.loop, metrics=metrics, telemetry=telemetry,
        )
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._done = threading.Event()
        self._error: str | None = None
        self._start_info: dict[str, Any] | None = None
        # Resume before the actor counts as ready (checkpoint, own unacked entries, stale ones):
        # a checkpoint of another model fails the actor's creation with a clear error.
        self._start_info = self.loop.start()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(self._stop, self._drain)
        except Exception as err:  # noqa: BLE001 - any failure: die so Ray restarts us from the checkpoint
            self._error = f"{type(err).__name__}: {err}"
            log.exception("learner loop failed; exiting so that Ray restarts the learner from its checkpoint")
            logging.shutdown()
            os._exit(1)  # a thread cannot end its actor otherwise; the restart resumes exactly (module doc)
        finally:
            self._done.set()

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started_at": self.started_at, "running": not self._done.is_set(),
                "error": self._error, "start": self._start_info, **self.loop.status()}

    def drain(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """Ask the loop to read the stream to its end, publish a last version and checkpoint; wait."""
        self._drain.set()
        if not self._done.wait(timeout_s):
            raise ServiceError(f"learner did not drain the stream within {timeout_s:g} s")
        if self._error is not None:
            raise ServiceError(f"learner loop failed: {self._error}")
        return self.status()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def ping(self) -> int:
        return os.getpid()


def learner_placement(num_gpus: float = 0.0, num_cpus: float = 1.0) -> dict[str, Any]:
    """Ray options of the learner actor: pinned to the node advertising `dvi_learner` (cluster.yaml's head)."""
    import ray

    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if ray.is_initialized() and ray.cluster_resources().get("dvi_learner", 0) >= 1:
        options["resources"] = {"dvi_learner": 1}
    return options


def create_learner_actor(settings: LearnerSettings, *, max_restarts: int = 10, num_cpus: float = 1.0,
                         num_gpus: float = 0.0, name: str | None = None) -> Any:
    """The learner as a restartable Ray actor; method calls are retried across restarts."""
    import ray

    options = dict(learner_placement(num_gpus, num_cpus), max_restarts=max_restarts, max_task_retries=-1)
    if name:
        options["name"] = name
    return ray.remote(LearnerService).options(**options).remote(settings)
