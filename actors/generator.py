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

A record the store refuses (bad checksum or signature -> `WeightIntegrityError`, tensors that do
not fit this drafter -> `AdapterError`) is logged, counted and remembered; the generator keeps
serving with the weights it has. A publish that fails (too large, Redis down, backpressure) is
counted and the request's answer is still returned: serving never waits on learning.

`watch` (run in a thread by the Ray shell) waits on the store's pub/sub notices so an idle
generator swaps as soon as a version is published, not only at its next request.

Two guards watch the drafter (both pure, in `common.drift`); neither touches the output, which
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
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from common.codec import CodecError
from common.config import DecodeConfig
from common.drift import ArFallback, ArFallbackConfig, DriftDecision, DriftGuard, DriftGuardConfig
from common.errors import AdapterError, ServiceError
from common.model_split import SplitModel
from common.prompts import encode_prompt, fit_to_context
from common.speculative import GenerationResult, SpeculativeDecoder
from common.transport import TrajectoryStream
from common.weights import WeightIntegrityError, WeightNotFoundError, WeightStore

log = logging.getLogger(__name__)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


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

    def __post_init__(self) -> None:
        _check(bool(self.actor_id) and not any(c.isspace() for c in self.actor_id),
               f"actor_id must be a non-empty name without spaces, got {self.actor_id!r}")
        _check(self.metrics_every_s > 0, f"metrics_every_s must be > 0, got {self.metrics_every_s}")
        _check(self.ar_fallback_gamma >= 1, f"ar_fallback_gamma must be >= 1, got {self.ar_fallback_gamma}")

    @property
    def uses_ar_fallback(self) -> bool:
        return (not self.learn) if self.ar_fallback is None else self.ar_fallback


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
    from (None: never swap). metrics: a `common.metrics.MetricsRecorder` or None. telemetry: an
    object with `publish_actor(actor_id, snapshot)` and `event(kind, **fields)`
    (common.telemetry.Telemetry) or None.
    Thread-safe: `serve`, `sync_weights` and `watch` may run on different threads.
    """

    def __init__(
        self,
        split: SplitModel,
        config: GeneratorConfig = GeneratorConfig(),
        *,
        stream: TrajectoryStream | None = None,
        weights: WeightStore | None = None,
        metrics: Any = None,
        telemetry: Any = None,
    ) -> None:
        if config.learn and stream is None:
            raise ValueError("a generator with learn=True needs a TrajectoryStream")
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
        self.counters: dict[str, int] = {
            "requests": 0,
            "tokens": 0,
            "drafted": 0,
            "accepted": 0,
            "lookup_drafted": 0,
            "lookup_accepted": 0,
            "verifier_passes": 0,
            "published": 0,
            "publish_failed": 0,
            "publish_skipped_empty": 0,
            "swaps": 0,
            "weights_refused": 0,
            "prompts_truncated": 0,
            "rollbacks": 0,
            "ar_fallbacks": 0,
            "ar_releases": 0,
        }
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

        Never raises for a bad record (refused, counted) or a vanished one (tried again later).
        Redis errors propagate as ServiceError only from `latest_version`.
        """
        if self.weights is None:
            return self.version
        with self._sync_lock:
            latest = self.weights.latest_version()
            self.latest_known = latest
            if latest is None or latest <= self.version or self._skipped(latest):
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
                if newer is not None and not self._skipped(newer):
                    self.sync_weights()
                self.republish_metrics()
            except ServiceError as err:
                log.warning("actor %s: weight watcher: %s; retrying", self.config.actor_id, err)
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
        new_tokens, tau, acceptance, drafted, accepted, seconds, tokens_per_s, published,
        prompt_truncated, finished_by_eos. ValueError for an empty or unfittable prompt.
        """
        _check(bool(request_id), "request_id must be non-empty")
        self.sync_weights()  # between requests only
        ids = self.prompt_ids(prompt, prompt_ids)
        ids, truncated = self._fit(ids, decode)
        config = replace(decode, record_trajectories=self.config.learn)
        generator = torch.Generator().manual_seed(self.config.seed ^ zlib.crc32(request_id.encode()))
        with self._model_lock:
            result = self.decoder.generate(ids, config, generator=generator, request_id=request_id)
        self._last_gamma = 0 if self.ar_active else decode.gamma
        published = self._publish(result) if self.config.learn else False
        out = self._account(request_id, ids, result, published, truncated)
        self._record_request_metrics(result)
        self._judge(result)
        self._emit_fallback_events()
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

    def _publish(self, result: GenerationResult) -> bool:
        traj = result.trajectory
        assert traj is not None and self.stream is not None
        if traj.num_scored == 0:  # nothing scored (a one-token answer): no signal
            self.counters["publish_skipped_empty"] += 1
            return False
        try:
            self.stream.publish(traj)
        except (CodecError, ServiceError) as err:
            self.counters["publish_failed"] += 1
            log.warning(
                "actor %s: trajectory of request %s (v%d) not published: %s",
                self.config.actor_id, traj.request_id, traj.weight_version, err,
            )
            return False
        self.counters["published"] += 1
        return True

    def _account(self, request_id, ids, result: GenerationResult, published: bool, truncated: bool) -> dict[str, Any]:
        c = self.counters
        c["requests"] += 1
        c["tokens"] += len(result.token_ids)
        c["drafted"] += result.drafted
        c["accepted"] += result.accepted
        c["lookup_drafted"] += result.lookup_drafted
        c["lookup_accepted"] += result.lookup_accepted
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
            "tau": result.mean_accepted,
            "acceptance": result.acceptance_rate,
            "drafted": result.drafted,
            "accepted": result.accepted,
            "lookup_drafted": result.lookup_drafted,
            "lookup_accepted": result.lookup_accepted,
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
            "tau": last.mean_accepted if last is not None else 0.0,
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
        m.set("dvi_actor_tau", result.mean_accepted, av)
        m.set("dvi_actor_acceptance_rate", result.acceptance_rate, av)
        lookups = result.lookup_drafted
        m.set("dvi_actor_context_acceptance_rate", result.lookup_accepted / lookups if lookups else 0.0, actor)
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
        self._record_version_metrics()

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
        m.set("dvi_actor_adapter_version", self.version, actor)
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
