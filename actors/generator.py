"""The generation side of the service as a plain class: serve requests, publish trajectories,
hot-swap drafter weights between requests.

A `Generator` owns one `SplitModel` (loaded once) and serves one request at a time with the
lossless `SpeculativeDecoder`. Around each request it:

  1. checks the `WeightStore` for a newer weight version and, if there is one, fetches it
     (sha256 and, with a secret, HMAC verified) and swaps the drafter's LoRA tensors in with
     `SplitModel.load_adapter_state`. A swap happens only between requests, never inside one
     (the model lock is held for the whole decode), so a request is drafted by exactly one
     weight version, the one its trajectory carries;
  2. decodes, recording the trajectory when learning is on;
  3. publishes the trajectory to the `TrajectoryStream` for the learner.

A record the store refuses (bad checksum or signature, non-finite values ->
`WeightIntegrityError`, tensors that do not fit this drafter -> `AdapterError`, a version more
than `max_version_jump` ahead) is logged, counted and remembered; the generator keeps serving
with the weights it has. Serving never waits on learning, nor on Redis:

  * each trajectory is numbered (producer id, 1-based `pseq`) and put in a bounded local
    outbox; `flush` sends the outbox in order and keeps what Redis did not take. When the outbox
    is full the oldest entry is dropped and counted (`trajectories_lost`); the learner sees the
    hole in the numbering and counts it too, so nothing is lost silently;
  * while Redis is away (a command failed after the client's own retries) the serving path
    skips Redis for `redis_retry_s` (doubling up to `redis_retry_max_s`) and serves on the
    weights it has; the watcher thread keeps trying, swaps and flushes once Redis answers.
    Health (`redis_ok`, outages, outbox size, lost) is in `status`, the snapshot and metrics.

`watch` (run in a thread by the Ray shell) waits on the store's pub/sub notices so an idle
generator swaps as soon as a version is published, not only at its next request.

Two guards watch the drafter (both pure, in `common.observe.drift`); neither touches the output, which
the verifier decides token by token, so both are speed decisions:

  * `DriftGuard` judges each new weight version once, after `window` drafted tokens. A version
    whose acceptance fell more than `margin` below the last good one is *rolled back*: the good
    version's tensors (kept in memory, else fetched from the store) are swapped back in, the bad
    version is blocked (`sync_weights` never takes it again), and a `rollback` event goes to the
    telemetry event stream, which is how the learner hears of it.
  * `ArFallback` is the decoder's gamma policy: while a block commits fewer tokens than it costs
    (tau below `break_even_tau(k, L, gamma)`) it decodes with gamma 0 and probes now and then;
    transitions become `ar_fallback` / `ar_release` events. A weight swap triggers a probe.

No Ray here; tests drive a `Generator` in-process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from common.core.codec import CodecError
from common.core.config import DecodeConfig
from common.observe.drift import ArFallback, ArFallbackConfig, DriftDecision, DriftGuard, DriftGuardConfig
from common.core.errors import AdapterError, ServiceError, WeightIntegrityError, WeightNotFoundError
from common.model.split import SplitModel
from common.core.prompts import encode_prompt, fit_to_context
from common.decoding.speculative import GenerationResult, SpeculativeDecoder
from common.transport.protocols import MetricsSink, TelemetrySink, TrajectorySink, WeightSource
from common.core.config import require

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class GeneratorConfig:
    """Identity and behaviour of one generation actor."""

    actor_id: str = "actor-0"
    """Name of this actor in logs, metrics, telemetry and results."""
    learn: bool = True
    """Record and publish each request's trajectory for the learner."""
    seed: int = 0
    """Base seed; each request samples from its own generator seeded with seed ^ crc32(request_id)."""
    truncate_prompts: bool = False
    """Keep only a prompt's last tokens when prompt + max_new_tokens exceeds the context (False: the
    request is rejected with RequestRejected, which the pool reports as skipped)."""
    metrics_every_s: float = 5.0
    """Re-send gauges at least this often (Ray expires gauges that are not re-reported)."""
    drift_guard: DriftGuardConfig | None = field(default_factory=DriftGuardConfig)
    """When a new weight version counts as a regression and is rolled back; None: never judge."""
    ar_fallback: bool | None = None
    """Decode autoregressively while drafting is slower than AR. None: on unless `learn` (a
    learning actor keeps drafting, or the learner would starve of trajectories)."""
    ar_fallback_config: ArFallbackConfig | None = None
    """Fall-back thresholds; None: `ArFallbackConfig.for_model(k, L, ar_fallback_gamma)` for this drafter."""
    ar_fallback_gamma: int = DecodeConfig.gamma
    """Draft length the default break-even tau is computed for (the service's usual gamma)."""
    outbox_size: int = 256
    """Trajectories held locally while Redis is away; beyond it the oldest is dropped and counted."""
    max_version_jump: int = 1_000
    """A weight version more than this far above the current one is refused (a forged or runaway
    version number must not make the actor chase it)."""
    redis_retry_s: float = 1.0
    """After a Redis failure the serving path leaves Redis alone this long (then doubles)."""
    redis_retry_max_s: float = 8.0
    """Longest such pause."""

    def __post_init__(self) -> None:
        require(bool(self.actor_id) and not any(c.isspace() for c in self.actor_id),
               f"actor_id must be a non-empty name without spaces, got {self.actor_id!r}")
        require(self.metrics_every_s > 0, f"metrics_every_s must be > 0, got {self.metrics_every_s}")
        require(self.ar_fallback_gamma >= 1, f"ar_fallback_gamma must be >= 1, got {self.ar_fallback_gamma}")
        require(self.outbox_size >= 1, f"outbox_size must be >= 1, got {self.outbox_size}")
        require(self.max_version_jump >= 1, f"max_version_jump must be >= 1, got {self.max_version_jump}")
        require(0 < self.redis_retry_s <= self.redis_retry_max_s,
               f"need 0 < redis_retry_s <= redis_retry_max_s, got {self.redis_retry_s}, {self.redis_retry_max_s}")

    @property
    def uses_ar_fallback(self) -> bool:
        return (not self.learn) if self.ar_fallback is None else self.ar_fallback


COUNTER_NAMES = (
    "requests", "tokens", "drafted", "accepted", "context_drafted", "context_accepted", "traffic_drafted",
    "traffic_accepted", "verifier_passes",
    "published", "publish_failed", "publish_skipped_empty", "swaps", "weights_refused", "prompts_truncated",
    "rollbacks", "ar_fallbacks", "ar_releases", "trajectories_produced", "trajectories_lost", "redis_outages",
)
"""What `Generator.counters` counts (all start at 0; `status()` reports them)."""


@dataclass(frozen=True)
class SwapEvent:
    """One hot swap: the version loaded, when the learner published it, when it was live here."""

    version: int
    created_at: float
    swapped_at: float

    @property
    def lag_s(self) -> float:
        return self.swapped_at - self.created_at


class Generator:
    """Serves requests with one SplitModel; publishes trajectories; hot-swaps weight versions.

    stream: where trajectories go (required when config.learn). weights: where versions come
    from (None: never swap). metrics: a `common.observe.metrics.MetricsRecorder` or None. telemetry: an
    object with `publish_actor(actor_id, snapshot)` and `event(kind, **fields)`
    (common.transport.redis.telemetry.Telemetry) or None.
    Thread-safe: `serve`, `sync_weights` and `watch` may run on different threads.
    """

    def __init__(
        self,
        split: SplitModel,
        config: GeneratorConfig = GeneratorConfig(),
        *,
        stream: TrajectorySink | None = None,
        weights: WeightSource | None = None,
        metrics: MetricsSink | None = None,
        telemetry: TelemetrySink | None = None,
    ) -> None:
        if config.learn and stream is None:
            raise ValueError("a generator with learn=True needs a trajectory sink (stream)")
        self.split = split
        self.config = config
        self.stream = stream
        self.weights = weights
        self.metrics = metrics
        self.telemetry = telemetry
        self.guard = DriftGuard(config.drift_guard) if config.drift_guard is not None else None
        self.fallback: ArFallback | None = None
        if config.uses_ar_fallback:
            self.fallback = ArFallback(config.ar_fallback_config or ArFallbackConfig.for_model(
                split.exit_layer, split.num_layers, config.ar_fallback_gamma))
        self.decoder = SpeculativeDecoder(split, gamma_policy=self.fallback)
        self._model_lock = threading.Lock()  # held for a whole decode and for a swap
        self._sync_lock = threading.Lock()  # one fetch, swap or rollback at a time; taken before _model_lock
        self.versions_seen: list[int] = [split.weight_version]
        self.refused_versions: list[int] = []
        self.blocked_versions: list[int] = []  # rolled back by the drift guard: never swapped to again
        self.rollbacks: list[DriftDecision] = []
        # Adapter tensors of recent versions (CPU copies, a few MB at most): a rollback swaps back
        # from here without a round trip, and works for a version the store has pruned or never had.
        self._adapters: dict[int, dict[str, torch.Tensor]] = {split.weight_version: split.adapter_state()}
        self._previous_version: int | None = None
        self.swaps: deque[SwapEvent] = deque(maxlen=1024)
        self.latest_known: int | None = None
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        # (pseq, request id, wire bytes) not yet taken by Redis; one producer id per process life
        self.producer_id = f"{config.actor_id}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self._pseq = 0
        self._outbox: deque[tuple[int, str, bytes]] = deque()
        self._outbox_lock = threading.Lock()
        self.redis_ok = True
        self._redis_pause = config.redis_retry_s
        self._redis_skip_until = 0.0
        self._blocked_loaded = False
        self._last_metrics = 0.0
        self._last: GenerationResult | None = None
        self._last_gamma = 0
        self._recorded_versions: set[int] = set()
        self._init_metrics()

    # ---------------------------------------------------------------------------------- weights

    @property
    def version(self) -> int:
        return self.split.weight_version

    def sync_weights(self) -> int:
        """Swap to the store's latest version if it is newer and verifies; return the version in use.

        Never raises: a bad record is refused and counted, a vanished one tried again later, and
        while Redis is away the generator keeps its weights (`redis_ok` False) and tries again.
        """
        if self.weights is None:
            return self.version
        try:
            return self._sync_weights()
        except ServiceError as err:
            self._redis_failed(err)
            return self.version

    def _sync_weights(self) -> int:
        with self._sync_lock:
            self._load_blocked()
            latest = self.weights.latest_version()
            self._redis_answered()
            self.latest_known = latest
            if latest is not None and latest > self.version and self._skipped(latest):
                latest = self._newest_good()  # e.g. a restarted actor under a rolled-back latest
            if latest is None or latest <= self.version or self._skipped(latest):
                return self.version
            if latest - self.version > self.config.max_version_jump:
                self._refuse(latest, f"a jump of {latest - self.version} versions > max_version_jump "
                                     f"{self.config.max_version_jump}")
                return self.version
            try:
                record = self.weights.fetch(latest)
            except WeightNotFoundError as err:  # pruned between GET latest and fetch: next time
                log.info("actor %s: weight version %d vanished before fetch: %s", self.config.actor_id, latest, err)
                return self.version
            except WeightIntegrityError as err:
                self._refuse(latest, f"integrity check failed: {err}")
                return self.version
            with self._model_lock:  # waits for the request in flight: never swap inside one
                previous = self.version
                try:
                    self.split.load_adapter_state(record.tensors, record.version)
                except AdapterError as err:
                    self._refuse(latest, f"does not fit this drafter: {err}")
                    return self.version
            self._remember_adapter(record.version, record.tensors, previous)
            if self.fallback is not None:
                self.fallback.probe_now()  # new weights: measure them instead of waiting out the probe interval
            event = SwapEvent(record.version, record.created_at, time.time())
            self.swaps.append(event)
            self.versions_seen.append(record.version)
            self.counters["swaps"] += 1
            log.info(
                "actor %s: hot-swapped drafter weights v%d -> v%d (%.3f s after publish)",
                self.config.actor_id, previous, record.version, event.lag_s,
            )
            self._record_version_metrics()
            return self.version

    def _skipped(self, version: int) -> bool:
        return version in self.refused_versions or version in self.blocked_versions

    def _newest_good(self) -> int | None:
        """The newest kept version above ours that is neither blocked nor refused, if any."""
        good = [v for v in self.weights.versions() if v > self.version and not self._skipped(v)]
        return max(good) if good else None

    def _load_blocked(self) -> None:
        """Once per process: the rollback verdicts stored in Redis (by this actor before a restart,
        or by any other); a blocked version is never swapped in."""
        if self._blocked_loaded or self.weights is None:
            return
        stored = self.weights.blocked_versions()
        self._blocked_loaded = True
        new = sorted(stored - set(self.blocked_versions))
        if new:
            self.blocked_versions.extend(new)
            log.warning("actor %s: weight versions %s were rolled back before; never taking them",
                        self.config.actor_id, new)

    # ---------------------------------------------------------------------------------- Redis health

    def _redis_failed(self, err: Exception) -> None:
        """Redis did not answer after the client's retries: serve on, leave Redis alone a while."""
        now = time.monotonic()
        if self.redis_ok:
            self.redis_ok = False
            self.counters["redis_outages"] += 1
            log.warning("actor %s: Redis unreachable (%s); serving on weight version %d, holding trajectories",
                        self.config.actor_id, err, self.version)
        else:
            self._redis_pause = min(self._redis_pause * 2, self.config.redis_retry_max_s)
        self._redis_skip_until = now + self._redis_pause
        self._record_health_metrics()

    def _redis_answered(self) -> None:
        if not self.redis_ok:
            log.info("actor %s: Redis is back", self.config.actor_id)
            self.redis_ok = True
            self._record_health_metrics()
        self._redis_pause = self.config.redis_retry_s
        self._redis_skip_until = 0.0

    def _redis_paused(self) -> bool:
        """True while the serving path should not wait on Redis (the watcher keeps trying)."""
        return not self.redis_ok and time.monotonic() < self._redis_skip_until

    def _remember_adapter(self, version: int, tensors: dict[str, torch.Tensor], previous: int) -> None:
        """Keep `version`'s tensors; drop all but the current, the previous and the guard's good one."""
        self._previous_version = previous
        self._adapters[version] = {k: v.detach().to("cpu").clone() for k, v in tensors.items()}
        keep = {version, previous, self.guard.good_version() if self.guard is not None else None}
        for v in [v for v in self._adapters if v not in keep]:
            del self._adapters[v]

    def _refuse(self, version: int, reason: str) -> None:
        self.refused_versions.append(version)
        self.counters["weights_refused"] += 1
        log.error(
            "actor %s: refused weight version %d (%s); keeping version %d",
            self.config.actor_id, version, reason, self.version,
        )

    def watch(self, stop: threading.Event, poll_s: float = 1.0) -> None:
        """Swap to each newly published version as its notice arrives, until `stop` is set.

        Notices are only hints: `WeightSubscriber.wait` also checks `latest_version()`, so a lost
        notice delays a swap by at most `poll_s`. Redis errors are logged and retried.
        """
        if self.weights is None:
            return
        subscriber = None
        while not stop.is_set():
            try:
                if subscriber is None:
                    subscriber = self.weights.subscribe()
                # past every version it will not take: a refused or rolled-back latest must not
                # wake it up again and again
                skip = max([self.version, *self.refused_versions, *self.blocked_versions])
                newer = subscriber.wait(newer_than=skip, timeout_s=poll_s)
                self._redis_answered()
                if newer is not None and not self._skipped(newer):
                    self.sync_weights()
                self.flush()
                self.republish_metrics()
            except ServiceError as err:
                self._redis_failed(err)
                log.debug("actor %s: weight watcher: %s; retrying", self.config.actor_id, err)
                if subscriber is not None:
                    subscriber.close()
                    subscriber = None
                stop.wait(poll_s)
        if subscriber is not None:
            subscriber.close()

    # ---------------------------------------------------------------------------------- serving

    def prompt_ids(self, prompt: str | None, prompt_ids: list[int] | None) -> list[int]:
        """Token ids for exactly one of `prompt` (chat-templated text) or `prompt_ids`."""
        if (prompt is None) == (prompt_ids is None):
            raise ValueError("pass exactly one of prompt (text) or prompt_ids")
        if prompt_ids is not None:
            return [int(t) for t in prompt_ids]
        return encode_prompt(self.split.tokenizer, prompt)

    def serve(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        decode: DecodeConfig = DecodeConfig(),
    ) -> dict[str, Any]:
        """Answer one request; publish its trajectory unless learning is off.

        Returns a JSON-able dict: request_id, actor, version, text, token_ids, prompt_tokens,
        new_tokens, tau, acceptance, drafted, accepted, seconds, tokens_per_s, published (its
        trajectory was queued for the learner), producer and pseq (that trajectory's number, or
        None), prompt_truncated, finished_by_eos. ValueError for an empty or unfittable prompt.
        """
        require(bool(request_id), "request_id must be non-empty")
        if not self._redis_paused():
            self.sync_weights()  # between requests only
        ids = self.prompt_ids(prompt, prompt_ids)
        ids, truncated = self._fit(ids, decode)
        config = replace(decode, record_trajectories=self.config.learn)
        generator = torch.Generator().manual_seed(self.config.seed ^ zlib.crc32(request_id.encode()))
        with self._model_lock:
            result = self.decoder.generate(ids, config, generator=generator, request_id=request_id)
        self._last_gamma = 0 if self.ar_active else decode.gamma
        pseq = self._publish(result) if self.config.learn else None
        out = self._account(request_id, ids, result, pseq is not None, truncated)
        out.update(producer=self.producer_id if pseq is not None else None, pseq=pseq)
        self._record_request_metrics(result)
        self._judge(result)
        self._emit_fallback_events()
        if not self._redis_paused():
            self._emit_telemetry()
        return out

    # ---------------------------------------------------------------------------------- guards

    @property
    def ar_active(self) -> bool:
        """True while the AR fall-back has drafting turned off."""
        return self.fallback is not None and self.fallback.active

    def _judge(self, result: GenerationResult) -> None:
        """Feed the drift guard this request's counts; roll back on its verdict."""
        if self.guard is None:
            return
        with self._sync_lock:  # no swap between the verdict and the rollback
            decision = self.guard.observe(result.weight_version, result.drafted, result.accepted)
            if decision is not None:
                self._rollback(decision)
        self._record_drift_metrics(result.weight_version)

    def _rollback(self, decision: DriftDecision) -> None:
        """Block `decision.bad_version` and, if it is in use, swap `decision.good_version` back in."""
        actor, bad, good = self.config.actor_id, decision.bad_version, decision.good_version
        self.blocked_versions.append(bad)
        if self.weights is not None:  # remembered across restarts, by every actor and the learner
            try:
                self.weights.block(bad, actor, f"acceptance {decision.before:.3f} -> {decision.after:.3f}")
            except ServiceError as err:
                log.error("actor %s: rollback of version %d not stored in Redis: %s", actor, bad, err)
        self.rollbacks.append(decision)
        self.counters["rollbacks"] += 1
        swapped = False
        if self.version == bad:
            tensors = self._adapters.get(good)
            if tensors is None and self.weights is not None:
                try:
                    tensors = self.weights.fetch(good).tensors
                except (WeightNotFoundError, WeightIntegrityError) as err:
                    log.error("actor %s: cannot roll back to weight version %d: %s", actor, good, err)
            if tensors is not None:
                with self._model_lock:
                    self.split.load_adapter_state(tensors, good)  # fitted before: cannot raise AdapterError
                self._remember_adapter(good, tensors, bad)
                self.versions_seen.append(good)
                swapped = True
                if self.fallback is not None:
                    self.fallback.probe_now()
        log.warning(
            "actor %s: drift guard rolled back weight version %d (acceptance %.3f over %d drafted tokens, "
            "%.3f under version %d)%s", actor, bad, decision.after, decision.drafted, decision.before, good,
            f"; serving version {good} again" if swapped else f"; serving version {self.version}",
        )
        if self.metrics is not None:
            self.metrics.inc("dvi_actor_rollbacks", 1, {"actor": actor})
            self.metrics.inc("dvi_drift_rollbacks", 1, {"version": bad})
            self._record_version_metrics()
        self._event("rollback", actor=actor, bad_version=bad, good_version=good, before=decision.before,
                    after=decision.after, drafted=decision.drafted, serving_version=self.version)

    def _emit_fallback_events(self) -> None:
        if self.fallback is None:
            return
        for ev in self.fallback.pop_events():
            actor = self.config.actor_id
            if ev.kind == "ar_fallback":
                self.counters["ar_fallbacks"] += 1
                log.warning("actor %s: drafting off (AR fall-back): tau EMA %.2f below break-even %.2f at version %d",
                            actor, ev.tau, ev.break_even, self.version)
                self._event("ar_fallback", actor=actor, tau_ema=ev.tau, break_even=ev.break_even,
                            blocks=ev.blocks, version=self.version)
            else:
                self.counters["ar_releases"] += 1
                log.info("actor %s: drafting on again: probe tau %.2f above break-even %.2f at version %d",
                         actor, ev.tau, ev.break_even, self.version)
                self._event("ar_release", actor=actor, tau_probe=ev.tau, break_even=ev.break_even,
                            blocks=ev.blocks, version=self.version)

    def _event(self, kind: str, **fields: Any) -> None:
        if self.telemetry is None:
            return
        try:
            self.telemetry.event(kind, **fields)
        except (ServiceError, ValueError) as err:  # best effort, like the snapshots
            log.warning("actor %s: %s event not published: %s", self.config.actor_id, kind, err)

    def _fit(self, ids: list[int], decode: DecodeConfig) -> tuple[list[int], bool]:
        ids, truncated = fit_to_context(ids, decode.max_new_tokens, self.split.max_positions, self.config.truncate_prompts)
        if truncated:
            self.counters["prompts_truncated"] += 1
            log.warning("actor %s: prompt cut to its last %d tokens", self.config.actor_id, len(ids))
        return ids, truncated

    def _publish(self, result: GenerationResult) -> int | None:
        """Number the trajectory, put it in the outbox, send what Redis takes; its number (pseq)
        if queued, None if there was nothing to send or it could not be encoded."""
        traj = result.trajectory
        assert traj is not None and self.stream is not None
        if traj.num_scored == 0:  # nothing scored (a one-token answer): no signal
            self.counters["publish_skipped_empty"] += 1
            return None
        try:
            data = self.stream.encode(traj)
        except CodecError as err:
            self.counters["publish_failed"] += 1
            log.warning("actor %s: trajectory of request %s (v%d) refused: %s",
                        self.config.actor_id, traj.request_id, traj.weight_version, err)
            return None
        with self._outbox_lock:
            self._pseq += 1
            pseq = self._pseq
            self.counters["trajectories_produced"] += 1
            if len(self._outbox) >= self.config.outbox_size:
                pseq, lost_id, _ = self._outbox.popleft()
                self.counters["trajectories_lost"] += 1
                if self.metrics is not None:
                    self.metrics.inc("dvi_actor_trajectories_lost", 1, {"actor": self.config.actor_id})
                log.error("actor %s: outbox full (%d) while Redis is away: dropped trajectory %d of request %s",
                          self.config.actor_id, self.config.outbox_size, pseq, lost_id)
            self._outbox.append((self._pseq, traj.request_id, data))
        if not self._redis_paused():
            self.flush()
        return pseq

    def flush(self) -> int:
        """Send the outbox in order; stop at the first Redis failure (kept for later). Returns sent."""
        if self.stream is None:
            return 0
        sent = 0
        with self._outbox_lock:
            while self._outbox:
                pseq, request_id, data = self._outbox[0]
                try:
                    self.stream.publish_raw(data, (self.producer_id, pseq))
                except ServiceError as err:  # BackpressureTimeout included: keep it, try later
                    self._redis_failed(err)
                    break
                self._outbox.popleft()
                self.counters["published"] += 1
                sent += 1
            buffered = len(self._outbox)
        if sent:
            self._redis_answered()
        if self.metrics is not None:
            self.metrics.set("dvi_actor_outbox", buffered, {"actor": self.config.actor_id})
        return sent

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    @property
    def last_pseq(self) -> int:
        """Trajectories this producer numbered so far (its last pseq)."""
        return self._pseq

    def _account(self, request_id, ids, result: GenerationResult, published: bool, truncated: bool) -> dict[str, Any]:
        c = self.counters
        c["requests"] += 1
        c["tokens"] += len(result.token_ids)
        c["drafted"] += result.drafted
        c["accepted"] += result.accepted
        c["context_drafted"] += result.context_drafted
        c["context_accepted"] += result.context_accepted
        c["traffic_drafted"] += result.traffic_drafted
        c["traffic_accepted"] += result.traffic_accepted
        c["verifier_passes"] += result.verifier_passes
        self._last = result
        tokenizer = self.split.tokenizer
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
        return {
            "request_id": request_id,
            "actor": self.config.actor_id,
            "version": result.weight_version,
            "text": text,
            "token_ids": list(result.token_ids),
            "prompt_tokens": len(ids),
            "new_tokens": len(result.token_ids),
            "tau": result.tau,
            "acceptance": result.acceptance_rate,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "context_drafted": result.context_drafted,
            "context_accepted": result.context_accepted,
            "traffic_drafted": result.traffic_drafted,
            "traffic_accepted": result.traffic_accepted,
            "verifier_passes": result.verifier_passes,
            "seconds": result.seconds,
            "tokens_per_s": len(result.token_ids) / result.seconds if result.seconds > 0 else 0.0,
            "published": published,
            "prompt_truncated": truncated,
            "finished_by_eos": result.finished_by_eos,
            "finished_at": time.time(),
        }

    # ---------------------------------------------------------------------------------- reporting

    def status(self) -> dict[str, Any]:
        """Version, ordered versions_seen, refused versions and counters (JSON-able)."""
        c = self.counters
        return {
            "actor": self.config.actor_id,
            "version": self.version,
            "latest_known": self.latest_known,
            "versions_seen": list(self.versions_seen),
            "refused_versions": list(self.refused_versions),
            "counters": dict(c),
            "tau": c["tokens"] / c["verifier_passes"] if c["verifier_passes"] else 0.0,
            "acceptance": c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
            "swaps": [e.__dict__ for e in self.swaps],
            "blocked_versions": list(self.blocked_versions),
            "rollbacks": [asdict(d) for d in self.rollbacks],
            "ar_fallback": self.ar_active,
            "redis_ok": self.redis_ok,
            "outbox": self.outbox_size,
            "producer": self.producer_id,
            "last_pseq": self.last_pseq,
        }

    def snapshot(self) -> dict[str, float | int | str]:
        """Flat numbers for the terminal monitor (telemetry)."""
        c = self.counters
        last = self._last
        return {
            "actor": self.config.actor_id,
            "version": self.version,
            "requests": c["requests"],
            "tokens": c["tokens"],
            "tokens_per_s": (len(last.token_ids) / last.seconds) if last is not None and last.seconds > 0 else 0.0,
            "tau": last.tau if last is not None else 0.0,
            "acceptance": last.acceptance_rate if last is not None else 0.0,
            "acceptance_by_position": _by_position(last),
            "gamma": self._last_gamma,
            "version_lag": max(0, self.latest_known - self.version) if self.latest_known is not None else 0,
            "tau_mean": c["tokens"] / c["verifier_passes"] if c["verifier_passes"] else 0.0,
            "acceptance_mean": c["accepted"] / c["drafted"] if c["drafted"] else 0.0,
            "published": c["published"],
            "swaps": c["swaps"],
            "weights_refused": c["weights_refused"],
            "rollbacks": c["rollbacks"],
            "blocked_versions": list(self.blocked_versions),
            "ar_fallback": int(self.ar_active),
            "redis_ok": int(self.redis_ok),
            "outbox": self.outbox_size,
            "trajectories_lost": c["trajectories_lost"],
            "redis_outages": c["redis_outages"],
            "acceptance_ema": self.guard.ema_by_version().get(self.version) if self.guard is not None else None,
            "updated_at": time.time(),
        }

    def _emit_telemetry(self) -> None:
        """The single telemetry call site of a generation actor (after each request)."""
        if self.telemetry is None:
            return
        try:
            self.telemetry.publish_actor(self.config.actor_id, self.snapshot())
        except (ServiceError, ValueError) as err:  # the monitor is best effort
            log.debug("actor %s: telemetry not published: %s", self.config.actor_id, err)

    def _record_request_metrics(self, result: GenerationResult) -> None:
        m = self.metrics
        if m is None:
            return
        actor = {"actor": self.config.actor_id}
        av = {**actor, "version": result.weight_version}
        if result.seconds > 0:
            m.set("dvi_actor_tokens_per_second", len(result.token_ids) / result.seconds, actor)
        m.inc("dvi_actor_requests_served", 1, actor)
        m.inc("dvi_actor_tokens_generated", len(result.token_ids), actor)
        m.set("dvi_actor_gamma", self._last_gamma, actor)
        m.set("dvi_actor_ar_fallback", 1.0 if self.ar_active else 0.0, actor)
        m.set("dvi_actor_tau", result.tau, av)
        m.set("dvi_actor_acceptance_rate", result.acceptance_rate, av)
        lookups = result.context_drafted
        m.set("dvi_actor_context_acceptance_rate", result.context_accepted / lookups if lookups else 0.0, actor)
        pooled = result.traffic_drafted
        m.set("dvi_actor_traffic_acceptance_rate", result.traffic_accepted / pooled if pooled else 0.0, actor)
        m.set("dvi_actor_traffic_ngrams", len(self.decoder.traffic), actor)
        self._recorded_versions.add(result.weight_version)
        accepted = result.accepted_by_position
        for pos, drafted in enumerate(result.drafted_by_position):
            if drafted:
                a = accepted[pos] if pos < len(accepted) else 0
                m.set("dvi_actor_acceptance_rate_by_position", a / drafted, {**actor, "position": pos})
        self._record_version_metrics()

    def _init_metrics(self) -> None:
        """Series that exist from the start: counters of rare events at 0, the gauges of state."""
        m = self.metrics
        if m is None:
            return
        actor = {"actor": self.config.actor_id}
        m.inc("dvi_actor_rollbacks", 0, actor)
        m.inc("dvi_drift_rollbacks", 0, {"version": self.version})  # "this version: 0 rollbacks"
        m.set("dvi_actor_ar_fallback", 0.0, actor)
        m.inc("dvi_actor_trajectories_lost", 0, actor)
        self._record_health_metrics()
        self._record_version_metrics()

    def _record_health_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        actor = {"actor": self.config.actor_id}
        m.set("dvi_actor_redis_up", 1.0 if self.redis_ok else 0.0, actor)
        m.set("dvi_actor_outbox", len(self._outbox), actor)

    def _record_drift_metrics(self, version: int) -> None:
        """The drift guard's view of `version`: its acceptance EMA and the change since the last broadcast."""
        m, guard = self.metrics, self.guard
        if m is None or guard is None:
            return
        ema = guard.ema_by_version().get(version)
        if ema is not None:
            m.set("dvi_drift_acceptance_ema", ema, {"actor": self.config.actor_id, "version": version})
        delta = guard.change_after_broadcast(version)
        if delta is not None:
            m.set("dvi_drift_broadcast_acceptance_delta", delta, {"version": version})
        self._recorded_versions.add(version)

    def _record_version_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        actor = {"actor": self.config.actor_id}
        m.set("dvi_actor_weight_version", self.version, actor)
        if self.latest_known is not None:
            m.set("dvi_actor_version_lag", max(0, self.latest_known - self.version), actor)
        keep = (self.version, self._previous_version)
        for old in [v for v in self._recorded_versions if v not in keep]:  # superseded series
            m.forget("dvi_actor_tau", {**actor, "version": old})
            m.forget("dvi_actor_acceptance_rate", {**actor, "version": old})
            m.forget("dvi_drift_acceptance_ema", {**actor, "version": old})
            m.forget("dvi_drift_broadcast_acceptance_delta", {"version": old})
            self._recorded_versions.discard(old)

    def republish_metrics(self) -> None:
        """Re-send gauges if `metrics_every_s` passed (Ray gauges expire when not re-reported)."""
        if self.metrics is None:
            return
        now = time.monotonic()
        if now - self._last_metrics >= self.config.metrics_every_s:
            self._last_metrics = now
            self.metrics.republish()


def _by_position(result: GenerationResult | None) -> list[float]:
    """Acceptance of draft position i given 0..i-1 accepted, from one request's counts."""
    if result is None:
        return []
    acc = result.accepted_by_position
    return [
        (acc[i] if i < len(acc) else 0) / d if d else 0.0 for i, d in enumerate(result.drafted_by_position)
    ]
