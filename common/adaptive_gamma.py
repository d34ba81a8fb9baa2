"""Adaptive gamma: how many tokens the exit head drafts in the next block.

A block that drafts g tokens commits, in expectation, E(g) = 1 + a + a^2 + ... + a^g tokens when
each draft is accepted with probability a (given the ones before it were), and costs about
verify + g * draft seconds (a verifier pass over g + 1 positions costs about the same as over one
while the batch is small; each drafted token costs one exit-head step plus its shallow pass).
`best_gamma` picks the g <= gamma_max with the most tokens per second; g = 0 skips the exit head.

`DraftStats` keeps the inputs as exponential moving averages measured on the live traffic: the
exit head's acceptance (per drafted token, up to a block's first rejection: what the confidence
stop lets through) and the wall time of a draft step and of a verifier pass, so the same rule
fits a CPU, where drafting is relatively dear, and a GPU. While g = 0 wins no acceptance is
observed, so every `probe_every` blocks one token is drafted anyway to notice a drafter that got
better (the learner keeps training it).
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, gamma: int) -> float:
    """E(g) = sum_{i=0..g} a^i: tokens a block drafting `gamma` commits in expectation."""
    return sum(acceptance**i for i in range(gamma + 1))


def best_gamma(acceptance: float, draft_seconds: float, verify_seconds: float, gamma_max: int) -> int:
    """argmax over g in [0, gamma_max] of E(g) / (verify + g * draft); the smallest g on ties."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if draft_seconds < 0 or verify_seconds <= 0 or gamma_max < 0:
        raise ValueError("need draft_seconds >= 0, verify_seconds > 0 and gamma_max >= 0")
    rates = [expected_tokens(acceptance, g) / (verify_seconds + g * draft_seconds) for g in range(gamma_max + 1)]
    return max(range(gamma_max + 1), key=lambda g: (rates[g], -g))


@dataclass
class DraftStats:
    """Running estimates for `best_gamma` (one per decoder: the drafter and the hardware, shared
    by every request it serves).

    acceptance: EMA of accepted (1) / rejected (0) exit-head drafts, starting at `prior`;
    draft_seconds / verify_seconds: EMAs of one draft step and one verifier pass (None until
    measured); decay: weight of the past in each EMA update; probe_every: blocks between forced
    one-token drafts while the rule says 0.
    """

    prior: float = 0.5
    decay: float = 0.9
    probe_every: int = 16
    acceptance: float | None = None
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    since_draft: int = 0

    def gamma(self, gamma_max: int) -> int:
        """The number of exit-head drafts for the next block (gamma_max until both costs are known)."""
        if gamma_max <= 0:
            return 0
        if self.draft_seconds is None or self.verify_seconds is None:
            return gamma_max
        acceptance = self.prior if self.acceptance is None else self.acceptance
        g = best_gamma(acceptance, self.draft_seconds, self.verify_seconds, gamma_max)
        if g == 0 and self.since_draft + 1 >= self.probe_every:
            return 1
        return g

    def observe_block(self, steps: int, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        """One exit-head block: `steps` exit-head calls (one more than `drafted` when the
        confidence stop ended the block), `drafted` tokens, the first `accepted` of them kept;
        time spent drafting (all steps) and verifying."""
        self.verify_seconds = _ema(self.verify_seconds, verify_seconds, self.decay)
        if steps:
            self.draft_seconds = _ema(self.draft_seconds, draft_seconds / steps, self.decay)
        if drafted == 0:
            self.since_draft += 1
            return
        self.since_draft = 0
        # one outcome per token up to the first rejection: accepted ones, then one rejection
        outcomes = [1.0] * accepted + ([0.0] if accepted < drafted else [])
        for outcome in outcomes:
            self.acceptance = _ema(self.prior if self.acceptance is None else self.acceptance, outcome, self.decay)


def _ema(current: float | None, value: float, decay: float) -> float:
    return value if current is None else decay * current + (1.0 - decay) * value
