"""How a generation actor protects itself from a bad drafter: pure logic, no Redis, no Ray.

Two guards, both fed only counts the decoder already keeps:

`DriftGuard` (per actor) judges each new weight version once, when the actor has drafted
`window` tokens under it: if its acceptance (accepted / drafted) is below the acceptance EMA of
the last good version minus `margin`, it answers `DriftDecision(action="rollback", ...)` and
blocks the version, so the actor swaps back and never swaps to it again. Otherwise the version
becomes the new good baseline. Output stays lossless either way (the verifier decides every
token); a bad drafter only costs speed, so a rollback is a speed decision, not a safety one.

`ArFallback` is a `gamma_policy` for `SpeculativeDecoder`: when the drafter is so poor that a
draft/verify block commits fewer tokens than it costs (tau below `break_even_tau`), it turns
drafting off (gamma = 0: plain autoregressive decoding through the same loop) and probes with
one drafted block every `probe_every` blocks, turning drafting back on when probes pay off.

`kl_slope` is the learner's side of drift: the trend of KL(verifier || drafter) over recent steps.

Cost model (`break_even_tau`), in units of one AR token = one pass through all L layers at
batch 1, where decoding is memory-bound so a layer costs about the same for 1 or a few positions:
  AR token                          L
  block with gamma drafts           (gamma + 1)·k        shallow layers on the last token and
                                                         on each draft
                                  + gamma·e              the exit head per draft (e layer-
                                                         equivalents: 1 exit layer + its LM head)
                                  + v·(L - k)            one deep pass over gamma + 1 positions
                                                         (v ≈ 1: as cheap as one position)
  relative block cost  c(gamma) = (gamma·(k + e) + k + v·(L - k)) / L  =  1 + gamma·(k + e)/L  at v = 1
A block commits tau tokens, AR commits 1 per unit, so speculation is faster iff tau > c(gamma).
The LM head is not free: for a small model with a large vocabulary (SmolLM2-135M: 49k x 576, about
8 decoder layers of weights) pass e = 1 + head cost to be conservative; e = 1 assumes the head
is cheap or shared with the verifier.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from common.core.config import require




def break_even_tau(
    exit_layer: int, num_layers: int, gamma: int, exit_cost_layers: float = 1.0, verify_cost: float = 1.0
) -> float:
    """tau below which a block of `gamma` drafts is slower than `gamma`-free AR (module docstring).

    `exit_layer` = k, `num_layers` = L, `exit_cost_layers` = e, `verify_cost` = v. Example: k = 8,
    L = 30, gamma = 5, e = 1: 1 + 5·9/30 = 2.5 tokens per verifier pass.
    """
    require(1 <= exit_layer < num_layers, f"exit_layer must be in [1, {num_layers - 1}], got {exit_layer}")
    require(gamma >= 0, f"gamma must be >= 0, got {gamma}")
    require(exit_cost_layers >= 0, f"exit_cost_layers must be >= 0, got {exit_cost_layers}")
    require(verify_cost > 0, f"verify_cost must be > 0, got {verify_cost}")
    k, L = exit_layer, num_layers
    return (gamma * (k + exit_cost_layers) + k + verify_cost * (L - k)) / L


# ---- drift guard ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftGuardConfig:
    """When a new weight version counts as a regression.

    Acceptance varies a lot from request to request (stories260K, k = 2, gamma 4, 128 new tokens,
    a learner-trained adapter on Spec-Bench dev prompts: 0.37 +- 0.15 per request, ~216 drafted
    tokens each), so a verdict must rest on several requests on both sides. Replaying those
    counts with identical weights re-published every 16 requests, window 256 / margin 0.1 (about
    one request against one) rolled back 3.3 of 9 judged versions, all falsely; window 1024 /
    margin 0.15 rolled back 0.2 of 9 (1.1 when the traffic arrives sorted by category). A version
    that accepts nothing is still caught after 1024 drafted tokens: two 128-token requests.
    """

    margin: float = 0.15
    """Absolute acceptance drop (new version vs the last good one) that triggers a rollback."""
    window: int = 1024
    """Drafted tokens under a new version before it is judged (once)."""
    min_baseline_tokens: int = 512
    """Drafted tokens a good version needs before it can serve as the baseline; without one the
    new version is accepted unjudged."""
    ema_tokens: float = 1024.0
    """Time constant of the per-version acceptance EMA, in drafted tokens."""
    max_versions: int = 64
    """Versions whose counts are kept (oldest forgotten first, never the newest good one); a
    service broadcasting every minute for days must not grow without bound. Blocks are kept."""

    def __post_init__(self) -> None:
        require(0.0 < self.margin < 1.0, f"margin must be in (0, 1), got {self.margin}")
        require(self.window >= 1, f"window must be >= 1, got {self.window}")
        require(self.min_baseline_tokens >= 1, f"min_baseline_tokens must be >= 1, got {self.min_baseline_tokens}")
        require(self.ema_tokens > 0, f"ema_tokens must be > 0, got {self.ema_tokens}")
        require(self.max_versions >= 2, f"max_versions must be >= 2, got {self.max_versions}")


@dataclass(frozen=True)
class DriftDecision:
    """A verdict that asks the actor to act."""

    action: str
    """"rollback": swap the drafter back to `good_version` and never use `bad_version` again."""
    bad_version: int
    good_version: int
    before: float
    """Acceptance EMA of good_version when bad_version was judged."""
    after: float
    """Acceptance of bad_version over the drafted tokens it was judged on."""
    drafted: int
    """Drafted tokens bad_version was judged on (>= window)."""


@dataclass
class _VersionStats:
    drafted: int = 0
    accepted: int = 0
    ema: float | None = None
    verdict: str | None = None  # None (unjudged), "good", "rollback"

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


class DriftGuard:
    """Per-actor acceptance bookkeeping by weight version, and the rollback verdict.

    The first version observed is good by definition. Any later version is judged once, at the
    first `observe` that brings it to >= `window` drafted tokens, against the baseline: the
    newest good version below it with >= `min_baseline_tokens` drafted. The baseline's EMA is
    used (its most recent acceptance, so slow traffic shifts do not count as a regression).
    Not thread-safe: call it from the decode loop.
    """

    def __init__(self, config: DriftGuardConfig = DriftGuardConfig()) -> None:
        self.config = config
        self._stats: dict[int, _VersionStats] = {}
        self._blocked: set[int] = set()
        self.rollbacks: list[DriftDecision] = []

    def observe(self, version: int, drafted: int, accepted: int) -> DriftDecision | None:
        """Add one request's (or block's) counts under `version`; a rollback decision or None."""
        require(version >= 0, f"version must be >= 0, got {version}")
        require(0 <= accepted <= drafted, f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")
        first = not self._stats
        if version not in self._stats:
            self._stats[version] = _VersionStats(verdict="good" if first else None)
            self._forget_old()
        stats = self._stats[version]
        if drafted == 0:  # AR blocks say nothing about the drafter
            return None
        stats.drafted += drafted
        stats.accepted += accepted
        rate = accepted / drafted
        if stats.ema is None:
            stats.ema = rate
        else:  # weight by tokens: `drafted` tokens move the EMA as much as that many single ones
            w = 1.0 - math.exp(-drafted / self.config.ema_tokens)
            stats.ema += w * (rate - stats.ema)
        if stats.verdict is not None or stats.drafted < self.config.window:
            return None
        return self._judge(version, stats)

    def _judge(self, version: int, stats: _VersionStats) -> DriftDecision | None:
        baseline = self._baseline(version)
        stats.verdict = "good"
        if baseline is None:
            return None
        good_version, good = baseline
        before, after = good.ema, stats.acceptance
        assert before is not None and after is not None
        if after >= before - self.config.margin:
            return None
        stats.verdict = "rollback"
        self._blocked.add(version)
        decision = DriftDecision("rollback", version, good_version, before, after, stats.drafted)
        self.rollbacks.append(decision)
        return decision

    def _forget_old(self) -> None:
        keep = self.good_version()
        for v in sorted(self._stats):
            if len(self._stats) <= self.config.max_versions:
                break
            if v != keep:
                del self._stats[v]

    def _baseline(self, version: int) -> tuple[int, _VersionStats] | None:
        for v in sorted(self._stats, reverse=True):
            s = self._stats[v]
            if v < version and s.verdict == "good" and s.drafted >= self.config.min_baseline_tokens:
                return v, s
        return None

    def is_blocked(self, version: int) -> bool:
        """True for a version that was rolled back: never swap to it again."""
        return version in self._blocked

    def good_version(self) -> int | None:
        """The newest version judged good (the one to roll back to), or None."""
        good = [v for v, s in self._stats.items() if s.verdict == "good"]
        return max(good) if good else None

    def acceptance_by_version(self) -> dict[int, float]:
        """Cumulative accepted / drafted per version that drafted anything."""
        return {v: s.acceptance for v, s in sorted(self._stats.items()) if s.acceptance is not None}

    def ema_by_version(self) -> dict[int, float]:
        """Acceptance EMA per version (metric `dvi_drift_acceptance_ema`)."""
        return {v: s.ema for v, s in sorted(self._stats.items()) if s.ema is not None}

    def drafted_by_version(self) -> dict[int, int]:
        return {v: s.drafted for v, s in sorted(self._stats.items())}

    def change_after_broadcast(self, version: int) -> float | None:
        """EMA under `version` minus EMA under the newest earlier version that drafted anything
        (metric `dvi_drift_broadcast_acceptance_delta`); None without both."""
        ema = self.ema_by_version()
        earlier = [v for v in ema if v < version]
        if version not in ema or not earlier:
            return None
        return ema[version] - ema[max(earlier)]


def kl_slope(steps: Sequence[float], kl: Sequence[float]) -> float | None:
    """Least-squares slope of `kl` against `steps`, per step (metric `dvi_drift_kl_slope`).

    > 0: the drafter is drifting away from the verifier over the window. None with fewer than
    two distinct steps. Non-finite points are left out (a skipped step reports NaN).
    """
    require(len(steps) == len(kl), f"steps and kl must have the same length, got {len(steps)}, {len(kl)}")
    points = [(float(x), float(y)) for x, y in zip(steps, kl) if math.isfinite(x) and math.isfinite(y)]
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    # slope = cov(x, y) / var(x)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


# ---- AR fallback ------------------------------------------------------------------------------


class _Result(Protocol):  # the fields of common.decoding.speculative.GenerationResult this module reads
    token_ids: list[int]
    verifier_passes: int
    drafted: int
    accepted: int


@dataclass(frozen=True)
class ArFallbackConfig:
    """When drafting is turned off because it is slower than autoregressive decoding."""

    break_even_tau: float = 2.5
    """tau (tokens per verifier pass) under which speculation loses to AR. The default is
    `break_even_tau(8, 30, 5)` for the default drafter (SmolLM2-135M, k = 8, gamma = 5); build
    it for another model with `ArFallbackConfig.for_model`."""
    window: int = 32
    """Drafting blocks the tau EMA must stay below break-even before falling back; also the EMA span."""
    probe_every: int = 16
    """Under fallback, every this many blocks one block drafts again to measure tau."""
    probe_gamma: int = 0
    """Draft length of a probe block (0: the request's own gamma)."""
    release_probes: int = 2
    """Fallback ends when the mean tau of this many latest probes exceeds break-even."""

    def __post_init__(self) -> None:
        require(self.break_even_tau >= 1.0, f"break_even_tau must be >= 1, got {self.break_even_tau}")
        require(self.window >= 1, f"window must be >= 1, got {self.window}")
        require(self.probe_every >= 1, f"probe_every must be >= 1, got {self.probe_every}")
        require(self.probe_gamma >= 0, f"probe_gamma must be >= 0, got {self.probe_gamma}")
        require(self.release_probes >= 1, f"release_probes must be >= 1, got {self.release_probes}")

    @classmethod
    def for_model(
        cls, exit_layer: int, num_layers: int, gamma: int, exit_cost_layers: float = 1.0, **overrides: Any
    ) -> ArFallbackConfig:
        """A config whose break-even follows `break_even_tau(exit_layer, num_layers, gamma, ...)`."""
        return cls(break_even_tau=break_even_tau(exit_layer, num_layers, gamma, exit_cost_layers), **overrides)


@dataclass(frozen=True)
class FallbackEvent:
    """A transition of `ArFallback`: kind is "ar_fallback" (drafting off) or "ar_release" (on)."""

    kind: str
    tau: float
    """The tau EMA when falling back; the mean probe tau when releasing."""
    break_even: float
    blocks: int
    """Drafting blocks observed so far (all requests)."""
    t: float


@dataclass
class _Tracked:
    result: Any
    passes: int
    drafted: int
    accepted: int


class ArFallback:
    """`gamma_policy(result, gamma) -> gamma` that falls back to AR when drafting does not pay.

    Per-block feedback comes from the change in `result.verifier_passes`, `drafted` and
    `accepted` since the policy last saw that same `result` object: one block's tau is
    1 + accepted / passes (the accepted drafts plus the verifier's own token; EOS or the budget
    may cut the committed tokens, which says nothing about the drafter). A result object not
    seen before is a new request; the last `max_tracked` results are re-checked on every call,
    so a request's final block is counted when the next request starts and requests interleaved
    on one decoder each get their own deltas. Thread-safe: `active` / `pop_events` may be read
    from a reporting thread.
    """

    def __init__(self, config: ArFallbackConfig = ArFallbackConfig(), max_tracked: int = 64) -> None:
        require(max_tracked >= 1, f"max_tracked must be >= 1, got {max_tracked}")
        self.config = config
        self.max_tracked = max_tracked
        self._alpha = 2.0 / (config.window + 1)
        self._lock = threading.Lock()
        self._tracked: OrderedDict[int, _Tracked] = OrderedDict()
        self._active = False
        self._ema: float | None = None
        self._below = 0  # consecutive drafting blocks with the EMA below break-even
        self._blocks = 0  # drafting blocks observed (including probes)
        self._since_probe = 0
        self._probes: list[float] = []
        self._events: list[FallbackEvent] = []

    # ---- the policy ---------------------------------------------------------------------------

    def __call__(self, result: _Result, gamma: int) -> int:
        with self._lock:
            self._observe(result)
            if not self._active or gamma == 0:
                return gamma
            self._since_probe += 1
            if self._since_probe >= self.config.probe_every:
                self._since_probe = 0
                return self.config.probe_gamma or gamma
            return 0

    def probe_now(self) -> None:
        """Make the next block a probe (e.g. right after the drafter's weights changed)."""
        with self._lock:
            if self._active:
                self._since_probe = self.config.probe_every - 1

    # ---- state --------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True while drafting is off (metric `dvi_actor_ar_fallback`)."""
        return self._active

    @property
    def tau_ema(self) -> float | None:
        """EMA of tau over drafting blocks outside fallback (None before the first)."""
        return self._ema

    @property
    def events(self) -> list[FallbackEvent]:
        """Transitions not yet taken with `pop_events`, oldest first."""
        with self._lock:
            return list(self._events)

    def pop_events(self) -> list[FallbackEvent]:
        """Return and clear the pending transitions (emit them as telemetry events)."""
        with self._lock:
            events, self._events = self._events, []
            return events

    # ---- internals ----------------------------------------------------------------------------

    def _observe(self, result: _Result) -> None:
        key = id(result)
        entry = self._tracked.get(key)
        if entry is None or entry.result is not result:  # a new request (or a reused id)
            self._tracked[key] = _Tracked(result, result.verifier_passes, result.drafted, result.accepted)
            self._tracked.move_to_end(key)
            while len(self._tracked) > self.max_tracked:
                self._tracked.popitem(last=False)
        else:
            self._tracked.move_to_end(key)
        for tracked in self._tracked.values():
            r = tracked.result
            passes = r.verifier_passes - tracked.passes
            drafted = r.drafted - tracked.drafted
            accepted = r.accepted - tracked.accepted
            if passes <= 0:
                continue
            tracked.passes, tracked.drafted, tracked.accepted = r.verifier_passes, r.drafted, r.accepted
            if drafted > 0:
                self._block(1.0 + accepted / passes)

    def _block(self, tau: float) -> None:
        cfg = self.config
        self._blocks += 1
        if self._active:  # only probes draft under fallback
            self._probes = (self._probes + [tau])[-cfg.release_probes :]
            if len(self._probes) == cfg.release_probes:
                mean = sum(self._probes) / len(self._probes)
                if mean > cfg.break_even_tau:
                    self._active = False
                    self._ema, self._below, self._probes = mean, 0, []
                    self._events.append(FallbackEvent("ar_release", mean, cfg.break_even_tau, self._blocks, time.time()))
            return
        self._ema = tau if self._ema is None else self._ema + self._alpha * (tau - self._ema)
        self._below = self._below + 1 if self._ema < cfg.break_even_tau else 0
        if self._below >= cfg.window:
            self._active = True
            self._since_probe, self._probes = 0, []
            self._events.append(FallbackEvent("ar_fallback", self._ema, cfg.break_even_tau, self._blocks, time.time()))
