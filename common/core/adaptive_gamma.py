"""Adaptive gamma: how many tokens the exit head drafts in the next block.

A block that drafts g tokens commits, in expectation, E(g) = 1 + a + a^2 + ... + a^g tokens when
each draft is accepted with probability a (given the ones before it were), and costs about
1 + g * (c + r) verifier passes, where c is the cost of one draft step relative to one verifier
pass (one exit-head step plus the drafted token's shallow pass) and r what the drafted token adds
to the verify pass as one more row (`SplitModel.row_cost`: about 0 where a pass streams its weights
whatever its rows, 0.1-0.2 on an AMD EPYC's 8-bit kernels with VNNI, 0.3-0.4 without; priced at
the block's sequence length, `SplitModel.costs`). `best_gamma` picks the g <= gamma_max with the
most tokens per unit of cost; g = 0 skips the exit head.

`DraftStats` keeps the acceptance as an exponential moving average over the live traffic (per
drafted token, up to a block's first rejection: what the confidence stop lets through). The cost
costs come from the model's structure (`SplitModel.draft_cost`, `row_cost`), or on native weights
from one timing at load, so within a process the choice is a deterministic function of the
decoded tokens. While g = 0 wins no acceptance is observed, so every `probe_every` blocks one token is
drafted anyway, to notice a drafter that got better (the learner keeps training it).
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, gamma: int) -> float:
    """E(g) = sum_{i=0..g} a^i: tokens a block drafting `gamma` commits in expectation."""
    return sum(acceptance**i for i in range(gamma + 1))


def best_gamma(acceptance: float, draft_cost: float, gamma_max: int, row_cost: float = 0.0) -> int:
    """argmax over g in [0, gamma_max] of E(g) / (1 + g * (draft_cost + row_cost)); the smallest g
    on ties.

    draft_cost: one draft step's cost in verifier passes (>= 0); row_cost: one more verify row's (>= 0)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
    if draft_cost < 0 or gamma_max < 0 or row_cost < 0:
        raise ValueError(f"need draft_cost, row_cost and gamma_max >= 0, got {draft_cost}, {row_cost}, {gamma_max}")
    step = draft_cost + row_cost
    rates = [expected_tokens(acceptance, g) / (1.0 + g * step) for g in range(gamma_max + 1)]
    return max(range(gamma_max + 1), key=lambda g: (rates[g] - 1e-12 * g))


@dataclass
class DraftStats:
    """The exit head's running acceptance, for `best_gamma` (one per decoder: a property of the
    drafter, shared by every request it serves).

    acceptance: EMA of accepted (1) / rejected (0) drafts, None before the first (then `prior`);
    decay: weight of the past in each update; probe_every: blocks between forced one-token
    drafts while the rule says 0; since_draft: blocks since the exit head last drafted.
    """

    prior: float = 0.5
    decay: float = 0.9
    probe_every: int = 16
    acceptance: float | None = None
    since_draft: int = 0

    def gamma(self, gamma_max: int, draft_cost: float, row_cost: float = 0.0) -> int:
        """The number of exit-head drafts for the next block."""
        if gamma_max <= 0:
            return 0
        acceptance = self.prior if self.acceptance is None else self.acceptance
        g = best_gamma(acceptance, draft_cost, gamma_max, row_cost)
        if g == 0 and self.since_draft + 1 >= self.probe_every:
            return 1
        return g

    def observe_block(self, drafted: int, accepted: int) -> None:
        """One exit-head block: `drafted` tokens (0 when the rule or the confidence stop skipped
        it), of which the first `accepted` were kept."""
        if drafted == 0:
            self.since_draft += 1
            return
        self.since_draft = 0
        # one outcome per token up to the first rejection: accepted ones, then one rejection
        for outcome in [1.0] * accepted + ([0.0] if accepted < drafted else []):
            current = self.prior if self.acceptance is None else self.acceptance
            self.acceptance = self.decay * current + (1.0 - self.decay) * outcome
