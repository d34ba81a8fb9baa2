"""The learner as a service: the Ray shell around `learner.loop.LearnerLoop` over Redis.

The learning logic (ingest, dedupe, staleness, step policy, publish cadence, checkpoint-then-ack)
lives in `learner/loop.py`, the same code `dvi train-local` runs in one process. This module only
wires it to Redis (`common.transport.redis.streams.TrajectoryStream`, `common.transport.redis.weights.WeightStore`, which also
keeps the namespace's publish log that `dvi/driver.py` reads) and makes it a Ray actor.

`LearnerService` is the Ray actor (`max_restarts`, default 10): it builds the loop and runs it on a
thread from `__init__`, so a restarted actor resumes by itself. Redis going away is not a failure:
the thread waits it out with exponential backoff (`dvi_learner_redis_up` 0 meanwhile), then
re-reads its own pending entries it may have lost track of and goes on; the constructor never
needs Redis, so a learner (re)started during an outage comes up and waits too. Any other failure
ends the process so Ray restarts it from the checkpoint. Every stream entry is decoded against
this model's `RecordLimits`: one that does not fit is dead-lettered with its reason. `drain` asks
the thread to finish the stream, publish a last version and checkpoint. It adds no math.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any


from common.core.config import ModelSpec
from common.core.errors import ServiceError
from common.core.codec import RecordLimits
from common.transport.redis.streams import TrajectoryStream, TransportConfig
from learner.config import LearnerConfig
from learner.loop import LearnerLoop, LearnerLoopConfig

log = logging.getLogger(__name__)

__all__ = ["LearnerLoop", "LearnerLoopConfig", "LearnerService", "LearnerSettings", "create_learner_actor",
           "learner_placement"]


def record_limits(split: Any) -> RecordLimits:
    """What a trajectory must fit to train this learner's drafter (vocabulary, hidden size, k)."""
    return RecordLimits(vocab_size=split.vocab_size, hidden_size=split.hidden_size, exit_layer=split.exit_layer,
                        max_context=split.max_positions or None)


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
    secret_file: str | None = None
    """File holding the HMAC secret weight records are signed with (never the secret itself: see
    common.transport.redis.weights.load_secret); None: $DVI_WEIGHT_SECRET, $DVI_WEIGHT_SECRET_FILE or ~/.dvi/weight-secret."""
    redis_backoff_max_s: float = 10.0
    """Longest wait between two tries while Redis is away (doubling from 0.25 s)."""
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
        from common.transport.redis.weights import service_store
        from learner.accounting import ProducerGaps
        from learner.learner import Learner

        self.settings = settings
        self.started_at = time.time()
        split, client = start_service_process(settings.model, settings.torch_threads, settings.redis_url)
        learner = Learner(split, settings.learner, learner_id=settings.loop.learner_id)
        ns = settings.transport.namespace
        metrics, telemetry = make_observers(client, ns, settings.metrics, settings.telemetry)
        gaps = ProducerGaps()
        self.loop = LearnerLoop(
            learner, TrajectoryStream(client, settings.transport, limits=record_limits(split), on_origin=gaps.observe),
            service_store(client, ns, split, settings.secret_file),
            settings.loop, metrics=metrics, telemetry=telemetry, accounting=gaps,
        )
        self.metrics = metrics
        self.redis_ok = True
        self.redis_outages = 0
        self._lost_reported = 0
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._done = threading.Event()
        self._error: str | None = None
        self._start_info: dict[str, Any] | None = None
        # Resume before the actor counts as ready (checkpoint, own unacked entries, stale ones):
        # a checkpoint of another model fails the actor's creation with a clear error. Redis away:
        # the loop thread starts it once Redis answers.
        try:
            self._start_info = self.loop.start()
        except ServiceError as err:
            self._redis_down(err)
        self._set_health()
        self._thread = threading.Thread(target=self._run, name="learner-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.25
        try:
            while not self._stop.is_set():
                try:
                    if not self.loop.started:
                        self._start_info = self.loop.start()
                    elif not self.redis_ok:
                        self.loop.resync()
                    if not self.redis_ok:
                        self.redis_ok, backoff = True, 0.25
                        log.info("learner: Redis is back; going on")
                        self._set_health()
                    self.loop.run(self._stop, self._drain)
                    return
                except ServiceError as err:  # Redis away: wait it out, nothing is lost (module doc)
                    self._redis_down(err)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.settings.redis_backoff_max_s)
        except Exception as err:  # noqa: BLE001 - any other failure: die so Ray restarts us from the checkpoint
            self._error = f"{type(err).__name__}: {err}"
            log.exception("learner loop failed; exiting so that Ray restarts the learner from its checkpoint")
            logging.shutdown()
            os._exit(1)  # a thread cannot end its actor otherwise; the restart resumes exactly (module doc)
        finally:
            self._done.set()

    def _redis_down(self, err: Exception) -> None:
        if self.redis_ok:
            self.redis_ok = False
            self.redis_outages += 1
            log.warning("learner: Redis unreachable (%s); waiting for it with backoff", err)
            self._set_health()

    def _set_health(self) -> None:
        if self.metrics is None:
            return
        self.metrics.set("dvi_learner_redis_up", 1.0 if self.redis_ok else 0.0)
        lost = self.loop.accounting.lost()
        self.metrics.inc("dvi_learner_trajectories_lost", max(0, lost - self._lost_reported))
        self._lost_reported = max(lost, self._lost_reported)

    def status(self) -> dict[str, Any]:
        """The loop's status plus health and the producers' accounting (`trajectories_lost`:
        holes in their numbering; `producers`: the highest number received from each)."""
        self._set_health()
        accounting = {"redis_ok": self.redis_ok, "redis_outages": self.redis_outages, "taken_in": self.taken_in(),
                      "trajectories_lost": self.loop.accounting.lost(), "producers": self.loop.accounting.highest()}
        if not self.redis_ok:  # the loop's own status reads Redis
            return {"pid": os.getpid(), "started_at": self.started_at, "running": not self._done.is_set(),
                    "error": self._error, "start": self._start_info, **accounting}
        return {"pid": os.getpid(), "started_at": self.started_at, "running": not self._done.is_set(),
                "error": self._error, "start": self._start_info, **self.loop.status(), **accounting}

    def taken_in(self) -> int:
        """Distinct trajectories the learner took in: added to the replay, or refused at intake as
        too stale (the learner's stale count also holds replay entries evicted as stale later,
        which were added first); both counts are checkpointed, so this survives restarts."""
        learner = self.loop.learner
        c = learner.counters()
        return int(c["added"]) + int(c["stale_dropped"]) - int(learner.replay.counters()["dropped_stale"])

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
