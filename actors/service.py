"""Generation actors on Ray: a thin shell around `actors.generator.Generator`, and a pool.

`GeneratorService` builds a `Generator` from picklable `GeneratorSettings` (model, Redis URL,
transport, where the weight secret is: never the secret itself), syncs it to the latest published weight version, and runs the weight watcher
thread. It adds no math. `ray.remote` is applied at the edge (`GeneratorPool`), with
`max_restarts=-1`: a killed actor comes back, re-runs `__init__`, and so re-syncs to the latest
verified weights before serving again.

Placement: one actor per GPU (`num_gpus=1`) when the cluster has GPUs, else a fraction of a CPU
(`cpus_per_actor`, default 0.5, so two actors and the learner fit on a 2-core machine). Inside
the actor the model goes to `cuda:0` when Ray gave it a GPU (Ray sets CUDA_VISIBLE_DEVICES), else
to the CPU with `torch_threads` intra-op threads.

`GeneratorPool.map` is the driver's work queue: each actor holds at most one request; when it
finishes, it gets the next prompt. A request whose actor died is retried (same request id, so
the learner dedupes a trajectory that was published twice) up to `max_attempts` times.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.generator import GeneratorConfig
from common.core.config import DecodeConfig, ModelSpec
from common.core.errors import RequestRejected, ServiceError
from common.transport.redis.streams import TransportConfig

log = logging.getLogger(__name__)


def cluster_gpus() -> float:
    """GPUs in the connected Ray cluster (0 when none, or when Ray is not initialised)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def root_cause(err: BaseException) -> str:
    """The original `Type: message` line of an error that crossed Ray (its text holds a traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else type(err).__name__


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything a generation actor needs to build itself; picklable, sent to Ray once."""

    model: ModelSpec
    """The base model, exit layer and LoRA shape; device "auto" picks cuda:0 when Ray gave a GPU."""
    redis_url: str
    """Where the trajectory stream, weight store and telemetry live."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    """Stream settings; `transport.namespace` is also the weight store and telemetry namespace."""
    secret_file: str | None = None
    """File holding the HMAC secret weight records are verified with (the secret never travels in
    pickled arguments); None: $DVI_WEIGHT_SECRET, $DVI_WEIGHT_SECRET_FILE or ~/.dvi/weight-secret."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The generator's identity and behaviour (actor id, learn, seed, guards, truncation)."""
    torch_threads: int = 1
    """Intra-op CPU threads (a fractional-CPU actor must not spawn one thread per core)."""
    watch: bool = True
    """Run the weight watcher thread (swap on publish notices while idle)."""
    metrics: bool = True
    """Record catalogue metrics (through Ray's metrics agent inside an actor)."""
    telemetry: bool = True
    """Publish snapshots for `dvi monitor` after each request."""

    @property
    def actor_id(self) -> str:
        return self.generator.actor_id


class GeneratorService:
    """Ray-side shell of one `Generator`. Methods are what the driver calls remotely."""

    def __init__(self, settings: GeneratorSettings) -> None:
        from actors.generator import Generator
        from common.runtime import make_observers, start_service_process
        from common.transport.redis.streams import TrajectoryStream
        from common.transport.redis.weights import service_store

        self.settings = settings
        self.started_at = time.time()
        split, client = start_service_process(settings.model, settings.torch_threads, settings.redis_url)
        weights = service_store(client, settings.transport.namespace, split, settings.secret_file)
        ns = settings.transport.namespace
        metrics, telemetry = make_observers(client, ns, settings.metrics, settings.telemetry)
        self.generator = Generator(
            split,
            settings.generator,
            stream=TrajectoryStream(client, settings.transport) if settings.generator.learn else None,
            weights=weights,
            metrics=metrics,
            telemetry=telemetry,
        )
        version = self.generator.sync_weights()  # (re)start: catch up with the learner first
        log.info("actor %s ready on %s (pid %d) at weight version %d", settings.actor_id, split.device, os.getpid(), version)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if settings.watch:
            self._watcher = threading.Thread(
                target=self.generator.watch, args=(self._stop,), name=f"{settings.actor_id}-weights", daemon=True
            )
            self._watcher.start()

    def serve(self, request_id: str, prompt: str | None = None, prompt_ids: list[int] | None = None,
              decode: DecodeConfig = DecodeConfig()) -> dict[str, Any]:
        return self.generator.serve(request_id, prompt=prompt, prompt_ids=prompt_ids, decode=decode)

    def sync(self) -> int:
        """Swap to the latest verified version now; return the version in use."""
        return self.generator.sync_weights()

    def flush(self, timeout_s: float = 30.0) -> int:
        """Send the trajectory outbox, retrying while Redis is away, for at most `timeout_s`;
        return what is left in it."""
        deadline = time.monotonic() + timeout_s
        while self.generator.outbox_size and time.monotonic() < deadline:
            if not self.generator.flush():
                time.sleep(0.5)
        return self.generator.outbox_size

    def status(self) -> dict[str, Any]:
        return {**self.generator.status(), "pid": os.getpid(), "started_at": self.started_at}

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        """Stop the watcher thread (before the actor is killed at the end of a run)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)


@dataclass(frozen=True)
class Request:
    """One unit of the driver's work queue."""

    request_id: str
    """Stable across retries, so a trajectory published twice is deduped by the learner."""
    prompt: str | None = None
    """Prompt text (chat-templated by the actor)."""
    prompt_ids: list[int] | None = None
    """Or the prompt's token ids."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Passed through to the result under "meta" (question_id, category, ...)."""


class GeneratorPool:
    """N generation actors on the connected Ray cluster, and a work queue over them.

    `settings_for(i)` gives actor i's settings (its actor_id must be unique). Actors are named
    `{name_prefix}-{actor_id}` in the Ray namespace, `lifetime` default (die with the driver).
    """

    def __init__(
        self,
        settings: list[GeneratorSettings],
        *,
        cpus_per_actor: float = 0.5,
        max_restarts: int = -1,
        name_prefix: str | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise ServiceError("Ray is not initialised: call dvi.driver.init_ray() (or ray.init) first")
        ids = [s.actor_id for s in settings]
        if not settings or len(set(ids)) != len(ids):
            raise ValueError(f"need at least one actor with unique actor_ids, got {ids}")
        self.settings = {s.actor_id: s for s in settings}
        self.placement = self.placement_options(cpus_per_actor)
        remote_cls = ray.remote(GeneratorService)
        self.actors: dict[str, Any] = {}
        for s in settings:
            options: dict[str, Any] = dict(self.placement, max_restarts=max_restarts, max_task_retries=0)
            if name_prefix:
                options["name"] = f"{name_prefix}-{s.actor_id}"
            self.actors[s.actor_id] = remote_cls.options(**options).remote(s)
        log.info("created %d generation actors with %s", len(settings), self.placement)

    @staticmethod
    def placement_options(cpus_per_actor: float = 0.5) -> dict[str, float]:
        """One actor per GPU when the cluster has GPUs, else a fraction of a CPU."""
        if cluster_gpus() > 0:
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": cpus_per_actor}

    def wait_ready(self, timeout_s: float = 600.0) -> dict[str, int]:
        """Block until every actor has loaded its model; return actor_id -> pid."""
        import ray

        refs = {aid: a.ping.remote() for aid, a in self.actors.items()}
        try:
            pids = ray.get(list(refs.values()), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise ServiceError(
                f"generation actors not ready after {timeout_s:g} s: does the cluster have the resources "
                f"{self.placement} per actor? (`ray status`)"
            ) from err
        except ray.exceptions.RayActorError as err:
            raise ServiceError(f"a generation actor failed to start: {root_cause(err)}") from err
        return dict(zip(refs, pids))

    def status(self, timeout_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """actor_id -> `Generator.status()` (versions_seen, counters, ...); {"error": ...} if unreachable."""
        import ray

        out: dict[str, dict[str, Any]] = {}
        for aid, actor in self.actors.items():
            try:
                out[aid] = ray.get(actor.status.remote(), timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                out[aid] = {"actor": aid, "error": str(err)}
        return out

    def flush_all(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Every live actor sends its trajectory outbox; actor_id -> entries left (-1: unreachable)."""
        import ray

        left: dict[str, int] = {}
        refs = {aid: a.flush.remote(timeout_s) for aid, a in self.actors.items()}
        for aid, ref in refs.items():
            try:
                left[aid] = ray.get(ref, timeout=timeout_s + 30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                log.warning("actor %s did not flush its outbox: %s", aid, err)
                left[aid] = -1
        return left

    def sync_all(self, timeout_s: float = 60.0) -> dict[str, int]:
        import ray

        return dict(zip(self.actors, ray.get([a.sync.remote() for a in self.actors.values()], timeout=timeout_s)))

    def map(
        self,
        requests: Iterable[Request],
        decode: DecodeConfig,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        max_attempts: int = 3,
        recover_timeout_s: float = 300.0,
    ) -> list[dict[str, Any]]:
        """Serve every request; each idle actor pulls the next one. Returns results in completion order.

        A result carries "meta" from its request. An actor that dies mid-request (Ray restarts it)
        is left alone until it answers a ping again (tried every second; given up after
        `recover_timeout_s`), and its request goes back to the front of the queue for the next
        idle actor. A request that cannot be served as given (RequestRejected: empty, too long for
        the context) yields {"request_id", "skipped": reason, "meta"}; one that fails
        `max_attempts` times (its actor died each time) or fails otherwise yields
        {"request_id", "error", "meta"}; so does every request left when no actor can serve any more.
        """
        return _Dispatch(self.actors, list(requests), decode, on_result, max_attempts, recover_timeout_s).run()

    def shutdown(self) -> None:
        """Stop watchers and kill the actors (no restart)."""
        import ray

        for actor in self.actors.values():
            try:
                ray.get(actor.stop.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            ray.kill(actor, no_restart=True)


class _Dispatch:
    """One `GeneratorPool.map`: a queue of requests, idle actors pulling from it, actors that died
    being pinged until they answer again (see `map` for the contract)."""

    def __init__(self, actors: dict[str, Any], requests: list[Request], decode: DecodeConfig,
                 on_result: Callable[[dict[str, Any]], None] | None, max_attempts: int, recover_timeout_s: float):
        self.actors, self.decode, self.on_result = actors, decode, on_result
        self.max_attempts, self.recover_timeout_s = max_attempts, recover_timeout_s
        self.queue = requests[::-1]  # pop() from the end = take the next in order
        self.attempts: dict[str, int] = {}
        self.in_flight: dict[Any, tuple[str, Request]] = {}
        self.pings: dict[Any, str] = {}
        self.recovering: dict[str, tuple[float, float]] = {}  # actor -> (since, next ping), monotonic
        self.idle: list[str] = list(actors)
        self.results: list[dict[str, Any]] = []

    def run(self) -> list[dict[str, Any]]:
        import ray

        self.dispatch()
        while self.in_flight or (self.queue and (self.pings or self.recovering)):
            self.ping_recovering()
            waiting = list(self.in_flight) + list(self.pings)
            if not waiting:
                time.sleep(0.2)
                continue
            done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            if done and done[0] in self.pings:
                self.on_ping(done[0])
            elif done:
                self.on_answer(done[0])
        for req in reversed(self.queue):  # no actor left to serve them
            self.finish({"request_id": req.request_id, "actor": None, "error": "no generation actor available"}, req)
        return self.results

    def finish(self, result: dict[str, Any], req: Request) -> None:
        self.results.append({**result, "meta": req.meta})
        if self.on_result is not None:
            self.on_result(self.results[-1])

    def dispatch(self) -> None:
        while self.queue and self.idle:
            actor_id, req = self.idle.pop(0), self.queue.pop()
            self.attempts[req.request_id] = self.attempts.get(req.request_id, 0) + 1
            ref = self.actors[actor_id].serve.remote(req.request_id, req.prompt, req.prompt_ids, self.decode)
            self.in_flight[ref] = (actor_id, req)

    def ping_recovering(self) -> None:
        """Ping each recovering actor when due; give up on one silent past `recover_timeout_s`."""
        now = time.monotonic()
        for actor_id, (since, due) in list(self.recovering.items()):
            if now - since > self.recover_timeout_s:
                log.error("actor %s did not come back within %g s; serving without it", actor_id, self.recover_timeout_s)
                del self.recovering[actor_id]
            elif due <= now:
                self.pings[self.actors[actor_id].ping.remote()] = actor_id
                self.recovering[actor_id] = (since, float("inf"))

    def on_ping(self, ref: Any) -> None:
        import ray

        actor_id = self.pings.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:  # still restarting: ask again in a second
            self.recovering[actor_id] = (self.recovering[actor_id][0], time.monotonic() + 1.0)
            return
        log.info("actor %s is back after %.1f s", actor_id, time.monotonic() - self.recovering.pop(actor_id)[0])
        self.idle.append(actor_id)
        self.dispatch()

    def on_answer(self, ref: Any) -> None:
        import ray

        actor_id, req = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # died mid-request: Ray restarts it
            if self.attempts[req.request_id] < self.max_attempts:
                log.warning("actor %s died serving %s; retrying elsewhere: %s", actor_id, req.request_id, err)
                self.queue.append(req)
            else:
                self.finish({"request_id": req.request_id, "actor": actor_id, "error": str(err)}, req)
            self.recovering[actor_id] = (time.monotonic(), time.monotonic())
            self.dispatch()
            return
        except ray.exceptions.RayTaskError as err:  # the request itself failed (bad prompt)
            result = _failed_request(err, req, actor_id)
        self.finish(result, req)
        self.idle.append(actor_id)
        self.dispatch()


def _failed_request(err: Exception, req: Request, actor_id: str) -> dict[str, Any]:
    """The result of a request whose task raised: skipped when it cannot be served as given
    (RequestRejected), else an error naming the cause."""
    cause = err.cause if getattr(err, "cause", None) is not None else err
    if isinstance(cause, RequestRejected):  # cannot be served as given: skipped, not failed
        return {"request_id": req.request_id, "actor": actor_id, "skipped": str(cause)}
    log.warning("request %s failed on actor %s: %s", req.request_id, actor_id, cause)
    return {"request_id": req.request_id, "actor": actor_id, "error": f"{type(cause).__name__}: {cause}"}
