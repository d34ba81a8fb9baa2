"""The service driver: Redis + Ray + one learner actor + N generation actors + a workload.

`run_service(RunConfig)`:
  1. resolves Redis (`redis_url`, checked with clear errors; none given: `embedded_redis`, i.e.
     the local server if one answers, else a private `redis-server` for the run's lifetime);
  2. starts or attaches Ray: `ray_address` given -> that cluster (ServiceError if none runs
     there); else `RAY_ADDRESS` set (as under `ray job submit`) -> that cluster; else a local Ray;
  3. creates the learner actor (unless `learn` is off) and N generation actors, waits for them;
  4. spreads the workload (Spec-Bench JSONL) over the actors: each idle actor pulls the next prompt;
  5. asks the learner to drain the stream (read everything, publish a last version, checkpoint)
     and lets every actor sync to that version;
  6. writes OUT/generations.jsonl (one line per prompt, in completion order) and OUT/summary.json.

Every run uses its own Redis namespace (`dvi:<run id>` unless given), so runs sharing a server
never see each other's streams or weights. The learner checkpoints to OUT/learner-checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig, ModelSpec
from common.core.errors import ServiceError
from common.core.prompts import SkippedRequest, require_some_served, skipped_summary, warn_skipped
from common.transport.redis.client import DEFAULT_REDIS_URL, connect, embedded_redis, expire_namespace, redact
from learner.config import LearnerConfig
from learner.loop import LearnerLoopConfig
from common.core.config import require

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "trajectories_produced",
    "trajectories_consumed",
    "dead_lettered",
    "trajectories_lost",
    "accounting_ok",
    "weight_versions_published",
    "versions_seen_per_actor",
    "tau_over_time",
    "wall_seconds",
)




@dataclass(frozen=True)
class RunConfig:
    """One service run; the CLI builds it from flags."""

    workload: Path
    """Spec-Bench-format JSONL of prompts (`question_id`, `category`, `turns`)."""
    out: Path
    """Directory for generations.jsonl, summary.json and the learner's checkpoint."""
    actors: int = 2
    """Generation actors (one per GPU where the cluster has GPUs)."""
    model: str = DEFAULT_MODEL
    """Model alias, local HF directory, or hub id."""
    exit_layer: int = DrafterConfig.exit_layer
    """k: the drafter runs layers [0, k)."""
    draft_vocab_size: int = DrafterConfig.draft_vocab_size
    """Tokens the drafter proposes from (0 = all); the learner picks them from the traffic."""
    dtype: str = "float32"
    """Base weights dtype."""
    device: str = "auto"
    """Model device inside each actor: auto = cuda:0 when Ray gave the actor a GPU, else cpu."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """gamma, temperature, max_new_tokens of every request."""
    learn: bool = True
    """Run the learner and publish trajectories; False serves with fixed weights."""
    publish_every: int = LearnerLoopConfig.publish_every_steps
    """Learner optimiser steps per weight version."""
    publish_every_s: float = LearnerLoopConfig.publish_every_s
    """Also publish after this many seconds with at least one step."""
    replay_ratio: float = LearnerLoopConfig.replay_ratio
    """Learner steps per batch of newly added drafted tokens."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimiser, schedule, replay, staleness."""
    limit: int | None = None
    """Serve only the first N prompts."""
    redis_url: str | None = None
    """Redis to use; None: the local one if it answers, else an embedded private server."""
    ray_address: str | None = None
    """Ray cluster to attach to ("auto", "host:port", "ray://..."); None: RAY_ADDRESS or a local Ray."""
    namespace: str | None = None
    """Redis key prefix; None: a fresh `dvi:<run id>`."""
    secret_file: Path | None = None
    """File holding the HMAC secret weight records are signed with. None: $DVI_WEIGHT_SECRET or
    $DVI_WEIGHT_SECRET_FILE if set; else on a local Ray a fresh secret in OUT/weight-secret (0600),
    on an existing cluster each node's ~/.dvi/weight-secret (cluster.yaml writes it)."""
    cpus_per_actor: float | None = None
    """CPU share per actor without GPUs; None: fit N actors + the learner into the cluster's CPUs."""
    seed: int = 0
    """Base sampling seed."""
    log_to_driver: bool = False
    """Forward actor logs to this terminal (local Ray only)."""
    drain_timeout_s: float = 600.0
    """Longest wait for the learner to drain the stream at the end."""
    keep_redis_s: float = 86_400.0
    """After the run, the namespace's keys (weights, telemetry) expire after this long; 0 keeps them."""
    ar_fallback: bool | None = None
    """Actors decode AR while drafting does not pay (common.observe.drift.ArFallback); None: on unless `learn`."""
    truncate_prompts: bool = False
    """A prompt too long for the context: keep its last tokens (False: skip it, counted in summary.json)."""

    def __post_init__(self) -> None:
        require(self.actors >= 1, f"actors must be >= 1, got {self.actors}")
        require(self.publish_every >= 1, f"publish-every must be >= 1, got {self.publish_every}")
        require(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        require(self.cpus_per_actor is None or self.cpus_per_actor > 0,
               f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        require(self.replay_ratio > 0, f"replay_ratio must be > 0, got {self.replay_ratio}")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, dtype=self.dtype, device=self.device,
                         drafter=DrafterConfig(exit_layer=self.exit_layer, draft_vocab_size=self.draft_vocab_size))


# ---------------------------------------------------------------------------------- Ray, Redis


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = False) -> bool:
    """Attach to a running Ray cluster or start a local one; return True if started here.

    `address` given: attach there ("auto" finds one on this machine), ServiceError with what to
    do when nothing runs there. Not given: `RAY_ADDRESS` (set by `ray job submit`) if set, else a
    local Ray without the dashboard. Already initialised: nothing to do.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 configure_logging=False)
        log.info("started a local Ray with %s", ray.cluster_resources())
        return True
    hint = "start one with `ray start --head` (or `ray up cluster.yaml`), or drop --ray-address for a local Ray"
    if address.startswith(("http://", "https://")):
        raise ServiceError(
            f"--ray-address {address} is a dashboard/job-server URL: pass the GCS address host:port "
            "(or submit with `ray job submit --address URL -- dvi run ...`)"
        )
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ServiceError(f"bad --ray-address {address!r}: expected host:port, auto, or ray://host:port")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except OSError as err:
            raise ServiceError(f"no Ray cluster at {address} ({err.strerror or err}): {hint}") from err
    try:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
    except ConnectionError as err:
        raise ServiceError(f"no Ray cluster at {address}: {hint}") from err
    log.info("attached to Ray at %s: %s", address, ray.cluster_resources())
    return False


@contextlib.contextmanager
def resolve_redis(url: str | None) -> Iterator[str]:
    """Yield a reachable Redis URL: `url` (checked, ServiceError naming the fix) or an embedded one."""
    if url is not None:
        connect(url, retries=2).close()
        yield url
        return
    with embedded_redis(DEFAULT_REDIS_URL) as found:
        yield found


def actor_cpus(total_cpus: float, actors: int, learner: bool) -> float:
    """CPU share per generation actor so N actors (+1 CPU for the learner) fit: at most 1, at least 0.1."""
    free = max(total_cpus - (1.0 if learner else 0.0), 0.1 * actors)
    return round(max(0.1, min(1.0, free / actors)), 3)


# ---------------------------------------------------------------------------------- the run


def served(result: dict[str, Any]) -> bool:
    """True for a pool result that answered its request (neither skipped nor failed)."""
    return "error" not in result and "skipped" not in result


def skipped_request(result: dict[str, Any]) -> SkippedRequest:
    """The SkippedRequest of a pool result with "skipped" (named by its question id when it has one)."""
    return SkippedRequest(str(result.get("meta", {}).get("question_id") or result["request_id"]), result["skipped"])


@dataclass
class RunState:
    """What the driver has seen so far; `on_result` callbacks read it for live views."""

    total: int
    started: float = field(default_factory=time.time)
    results: list[dict[str, Any]] = field(default_factory=list)
    versions_by_actor: dict[str, list[int]] = field(default_factory=dict)
    tau_over_time: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "starting"
    namespace: str = ""
    redis_url: str = ""
    """The resolved Redis URL (may hold a password: show it through `redact`)."""
    learner_actor: Any = None
    """The learner's Ray actor handle once created (fault-injection tools kill it)."""
    pool: Any = None
    """The `GeneratorPool` once created."""

    def add(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        if "skipped" in result:
            warn_skipped(skipped_request(result))
        if not served(result):
            return
        seen = self.versions_by_actor.setdefault(result["actor"], [])
        if result["version"] not in seen:
            seen.append(result["version"])
        self.tau_over_time.append({
            "t": round(result.get("finished_at", time.time()) - self.started, 3),
            "tau": result["tau"],
            "version": result["version"],
            "actor": result["actor"],
        })

    def skipped(self) -> list[SkippedRequest]:
        """The requests the actors could not serve as given, in completion order."""
        return [skipped_request(r) for r in self.results if "skipped" in r]

    def tau_by_version(self) -> dict[int, tuple[float, int]]:
        """version -> (tokens / verifier passes over its requests, requests)."""
        acc: dict[int, list[int]] = {}
        for r in self.results:
            if served(r):
                a = acc.setdefault(r["version"], [0, 0, 0])
                a[0] += r["new_tokens"]
                a[1] += r["verifier_passes"]
                a[2] += 1
        return {v: (a[0] / a[1] if a[1] else 0.0, a[2]) for v, a in sorted(acc.items())}


def run_service(
    config: RunConfig,
    on_result: Callable[[RunState, dict[str, Any]], None] | None = None,
    on_phase: Callable[[RunState], None] | None = None,
) -> dict[str, Any]:
    """Run the whole service once (module docstring); return the summary (also in OUT/summary.json)."""
    from common.core.prompts import load_prompts

    prompts = load_prompts(config.workload, config.limit)  # bad workload: fail before starting anything
    run_started = time.time()
    run_id = uuid.uuid4().hex[:12]
    namespace = config.namespace or f"dvi:{run_id}"
    state = RunState(total=len(prompts), namespace=namespace)

    def phase(name: str) -> None:
        state.phase = name
        log.info("run %s: %s", run_id, name)
        if on_phase is not None:
            on_phase(state)

    phase(f"checking {config.model} (the first run converts a GGUF model to safetensors once)")
    preflight(config)  # bad model, exit layer, secret: fail before Redis and Ray start
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    phase("connecting to Redis")
    with resolve_redis(config.redis_url) as redis_url:
        state.redis_url = redis_url
        phase("starting Ray (10-30 s)")
        started_ray = init_ray(config.ray_address, log_to_driver=config.log_to_driver)
        try:
            secret_file = resolve_secret_file(config, out, started_ray)
            return _Run(config, prompts, out, run_id, namespace, redis_url, state, phase, on_result, run_started,
                        secret_file).execute()
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def preflight(config: RunConfig) -> None:
    """Check the static arguments before anything starts (seconds, not the 30 s of a Ray start):
    the model resolves and its config reads, the exit layer fits it, and a weight secret named by
    file can be read. ValueError / ServiceError naming the fix."""
    from transformers import AutoConfig

    from common.core.errors import ModelLoadError
    from common.model.loading import resolve_model_path
    from common.transport.redis.weights import load_secret

    spec = config.model_spec()
    path = resolve_model_path(spec.model)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model '{spec.model}': {str(exc).splitlines()[0]}") from None
    num_layers = getattr(model_config, "num_hidden_layers", None)
    if num_layers is not None:
        spec.drafter.validate_for(int(num_layers))
    if config.secret_file is not None:
        load_secret(config.secret_file)


def resolve_secret_file(config: RunConfig, out: Path, local_ray: bool) -> str | None:
    """The secret file the actors and the learner read (a path: the secret never travels in
    pickled arguments). A local run without one gets a fresh secret in OUT/weight-secret."""
    from common.transport.redis.weights import SECRET_ENV, SECRET_FILE_ENV, write_secret_file

    if config.secret_file is not None:
        return str(Path(config.secret_file).resolve())
    if os.environ.get(SECRET_ENV) or os.environ.get(SECRET_FILE_ENV) or not local_ray:
        return None  # the variables (inherited by a local Ray) or each node's default file
    return str(write_secret_file(out / "weight-secret").resolve())


@dataclass
class _Run:
    """One run of the service once Redis and Ray are up: its fixed inputs and the actors it starts.
    `execute` runs the phases in order and always shuts the actors down."""

    config: RunConfig
    prompts: list
    out: Path
    run_id: str
    namespace: str
    redis_url: str
    state: RunState
    phase: Callable[[str], None]
    on_result: Callable[[RunState, dict[str, Any]], None] | None
    run_started: float
    secret_file: str | None
    learner_actor: Any = None
    pool: Any = None

    @property
    def transport(self):
        from common.transport.redis.streams import TransportConfig

        return TransportConfig(namespace=self.namespace)

    def execute(self) -> dict[str, Any]:
        try:
            self.start_learner()
            seen_before = self.start_generators()
            serve_seconds = self.serve()
            learner_status, statuses = self.finish()
            dead, published_log, latest = self.close_redis()
            summary = _summary(self.config, self.state, statuses, learner_status, dead, published_log, latest,
                               time.time() - self.run_started, serve_seconds, self.run_id, self.namespace,
                               seen_before)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.phase("done")
            require_some_served(len(self.state.results) - summary["skipped_requests"], self.state.skipped())
            return summary
        finally:
            self.shutdown()

    def start_learner(self) -> None:
        """The learner actor (learning runs only), resuming from OUT/learner-checkpoint if there is one."""
        from learner.service import LearnerLoopConfig, LearnerSettings, create_learner_actor

        config = self.config
        if not config.learn:
            return
        self.phase("starting the learner")
        loop = LearnerLoopConfig(
            learner_id="learner-0", checkpoint_dir=str((self.out / "learner-checkpoint").resolve()),
            publish_every_steps=config.publish_every, publish_every_s=config.publish_every_s,
            replay_ratio=config.replay_ratio,
        )
        self.learner_actor = create_learner_actor(LearnerSettings(
            model=config.model_spec(), redis_url=self.redis_url, transport=self.transport, learner=config.learner,
            loop=loop, secret_file=self.secret_file))
        self.state.learner_actor = self.learner_actor

    def start_generators(self) -> int:
        """Start the generation actors and wait until all are ready; return how many request ids
        the learner had seen before this run (a resumed learner has seen earlier runs')."""
        import ray

        from actors.generator import GeneratorConfig
        from actors.service import GeneratorPool, GeneratorSettings, root_cause

        config, spec = self.config, self.config.model_spec()
        cpus = config.cpus_per_actor or actor_cpus(ray.cluster_resources().get("CPU", 1.0), config.actors, config.learn)
        settings = [
            GeneratorSettings(model=spec, redis_url=self.redis_url, transport=self.transport,
                              secret_file=self.secret_file,
                              generator=GeneratorConfig(actor_id=f"actor-{i}", learn=config.learn, seed=config.seed,
                                                        ar_fallback=config.ar_fallback,
                                                        ar_fallback_gamma=max(1, config.decode.gamma),
                                                        truncate_prompts=config.truncate_prompts))
            for i in range(config.actors)
        ]
        self.phase(f"loading {config.model} in {config.actors} generation actor(s) (each loads it and checks the "
                   "split: about a minute on 2 CPU cores)")
        self.pool = GeneratorPool(settings, cpus_per_actor=cpus)
        self.state.pool = self.pool
        self.pool.wait_ready()
        if self.learner_actor is None:
            return 0
        try:
            return consumed_count(ray.get(self.learner_actor.status.remote(), timeout=600))
        except ray.exceptions.RayActorError as err:
            raise ServiceError(f"the learner actor failed to start: {root_cause(err)}") from err

    def serve(self) -> float:
        """Serve every prompt, writing OUT/generations.jsonl as results arrive; return the seconds."""
        from actors.service import Request

        requests = [Request(request_id=f"{self.run_id}-{i:05d}", prompt=p.text,
                            meta={"question_id": p.question_id, "category": p.category})
                    for i, p in enumerate(self.prompts)]
        state = self.state
        with (self.out / "generations.jsonl").open("w", encoding="utf-8") as generations:
            state.started = time.time()
            self.phase("serving")

            def record(result: dict[str, Any]) -> None:
                state.add(result)
                generations.write(json.dumps(_generation_line(result)) + "\n")
                generations.flush()
                if self.on_result is not None:
                    self.on_result(state, result)

            self.pool.map(requests, self.config.decode, on_result=record)
        return time.time() - state.started

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Flush the actors' outboxes, let the learner drain the stream, sync every actor to the
        final weights; return (the learner's status, the actors' statuses)."""
        import ray

        learner_status: dict[str, Any] = {}
        if self.config.learn:
            self.phase("actors flushing their outboxes")
            self.pool.flush_all()
        if self.learner_actor is not None:
            self.phase("learner draining the stream")
            timeout = self.config.drain_timeout_s
            learner_status = ray.get(self.learner_actor.drain.remote(timeout), timeout=timeout + 60)
        self.phase("syncing actors to the final weights")
        with contextlib.suppress(ray.exceptions.RayError):
            self.pool.sync_all()
        return learner_status, self.pool.status()

    def close_redis(self) -> tuple[int, list[dict], int | None]:
        """Read the run's dead letters, publish log and latest version; free the applied
        trajectories; let the namespace expire. Returns (dead letters, publish log, latest)."""
        from common.transport.redis.streams import TrajectoryStream
        from common.transport.redis.weights import WeightStore

        client = connect(self.redis_url)
        try:
            stream = TrajectoryStream(client, self.transport)
            store = WeightStore(client, self.namespace)
            dead, published_log, latest = stream.dead_letter_count(), store.publish_log(), store.latest_version()
            if self.config.learn and stream.pending_count() == 0:
                # every entry is applied and acked: free the trajectory payloads (weights and
                # telemetry stay for `dvi monitor` / `dvi report` until keep_redis_s)
                stream.clear()
            if self.config.keep_redis_s > 0:
                expire_namespace(client, self.namespace, self.config.keep_redis_s)
        finally:
            client.close()
        return dead, published_log, latest

    def shutdown(self) -> None:
        import ray

        if self.pool is not None:
            with contextlib.suppress(Exception):
                self.pool.shutdown()
        if self.learner_actor is not None:
            with contextlib.suppress(Exception):
                ray.get(self.learner_actor.stop.remote(), timeout=30)
            with contextlib.suppress(Exception):
                ray.kill(self.learner_actor, no_restart=True)


def _generation_line(result: dict[str, Any]) -> dict[str, Any]:
    meta = result.get("meta", {})
    line = {
        "question_id": meta.get("question_id"),
        "category": meta.get("category"),
        "request_id": result["request_id"],
        "actor": result.get("actor"),
    }
    if "error" in result:
        return {**line, "error": result["error"]}
    if "skipped" in result:
        return {**line, "skipped": result["skipped"]}
    return {
        **line,
        "version": result["version"],
        "text": result["text"],
        "tokens": result["new_tokens"],
        "tau": result["tau"],
        "acceptance": result["acceptance"],
        "seconds": result["seconds"],
        "published": result["published"],
        "prompt_truncated": result["prompt_truncated"],
    }


def consumed_count(learner_status: dict[str, Any]) -> int:
    """Distinct trajectories the learner took in (applied, or refused at intake as too stale);
    survives restarts (`LearnerService.taken_in`)."""
    return int(learner_status.get("taken_in", 0))


def lost_count(learner_status: dict[str, Any], statuses: dict[str, dict[str, Any]],
               results: list[dict[str, Any]] = ()) -> int:
    """Trajectories counted as lost: holes the learner found in producers' numbering, plus each
    producer's numbers after the last one the learner received (a tail no later entry revealed:
    an outbox still full at the end, or a killed actor's). A producer's last number comes from
    its status (live actors) and from the results it returned (killed ones too)."""
    lost = int(learner_status.get("trajectories_lost", 0))
    received = learner_status.get("producers", {})
    last: dict[str, int] = {}
    for st in statuses.values():
        if st.get("producer") is not None and st.get("last_pseq") is not None:
            last[st["producer"]] = max(last.get(st["producer"], 0), int(st["last_pseq"]))
    for r in results:
        if r.get("producer") is not None and r.get("pseq") is not None:
            last[r["producer"]] = max(last.get(r["producer"], 0), int(r["pseq"]))
    for producer, number in last.items():
        lost += max(0, number - int(received.get(producer, 0)))
    return lost


def _summary(config, state: RunState, statuses, learner_status, dead, published_log, latest, wall,
             serve_seconds, run_id, namespace, seen_before) -> dict[str, Any]:
    ok = [r for r in state.results if served(r)]
    skipped = state.skipped()
    produced = {r["request_id"] for r in ok if r["published"]}
    consumed = consumed_count(learner_status) - seen_before if learner_status else 0
    lost = lost_count(learner_status, statuses, state.results) if learner_status else 0
    counters = learner_status.get("learner", {}) if learner_status else {}
    versions: dict[str, list[int]] = {}
    for actor_id, st in statuses.items():  # what each actor served with, plus what it swapped to
        merged = set(state.versions_by_actor.get(actor_id, [])) | set(st.get("versions_seen", []))
        versions[actor_id] = sorted(merged)
    tokens = sum(r["new_tokens"] for r in ok)
    passes = sum(r["verifier_passes"] for r in ok)
    summary: dict[str, Any] = {
        "trajectories_produced": len(produced),
        "trajectories_consumed": consumed,
        "dead_lettered": dead,
        "trajectories_lost": lost,
        # produced = consumed (applied or too stale) + dead-lettered + counted as lost
        "accounting_ok": (not config.learn) or len(produced) == consumed + dead + lost,
        "weight_versions_published": len({e["version"] for e in published_log}),
        "versions_seen_per_actor": versions,
        "tau_over_time": state.tau_over_time,
        "wall_seconds": round(wall, 3),
        "learner": {
            "counters": counters,
            "loop": learner_status.get("loop", {}),
            "step": learner_status.get("step"),
            "final_version": latest,
            "last_stats": learner_status.get("last_stats"),
        } if config.learn else None,
        "requests": len(state.results),
        "failed_requests": len(state.results) - len(ok) - len(skipped),
        **skipped_summary(skipped),
        "tokens": tokens,
        "tokens_per_s": round(tokens / serve_seconds, 3) if serve_seconds > 0 else 0.0,
        "serve_seconds": round(serve_seconds, 3),
        "tau": passes and tokens / passes,
        "tau_by_version": {str(v): round(t, 4) for v, (t, _) in state.tau_by_version().items()},
        "actor_status": {
            a: {k: st.get(k) for k in ("version", "counters", "refused_versions", "redis_ok", "outbox", "error")
                if k in st}
            for a, st in statuses.items()
        },
        "run_id": run_id,
        "namespace": namespace,
        "redis_url": redact(state.redis_url),
        "config": _config_json(config),
    }
    return summary


def _config_json(config: RunConfig) -> dict[str, Any]:
    out = {}
    for key, value in asdict(config).items():
        if isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out
