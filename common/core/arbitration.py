"""Which draft source a block uses: the context or the exit head, by expected tokens per unit of cost.

A block verifies one draft in one verifier pass. Drafted from the **context** (prompt lookup,
common/core/context_draft.py), L tokens that followed a suffix n-gram of length n earlier in the
sequence; drafted by the **exit head**, up to g tokens one step at a time (adaptive gamma caps g,
common/core/adaptive_gamma.py). With per-token acceptance a (each token accepted given the ones before
it were), a block of d drafted tokens commits E(a, d) = 1 + a + ... + a^d tokens in expectation.

  context:  E(a_ctx[n], L) / (1 + c + L r)                 a_ctx[n]: this request's running acceptance
                                                           of context drafts matched on an n-gram of
                                                           length n
  exit head: (1 + p1 * E(a_head, g - 1)) / (1 + g (c + r))  p1 = (confidence + a_head) / 2: the head's
                                                           top-1 probability for the block's first
                                                           token, shrunk toward its running acceptance

c is one exit-head draft step in verifier passes (`SplitModel.draft_cost`), r one more row of the
verify pass (`SplitModel.row_cost`), both at the block's sequence length (`SplitModel.costs`):
every drafted token, from either source, is a row there.
The context's drafted rows go through the shallow layers in one batched pass. The decoder runs
them in the same pass as the block's input, which that pass reads the shallow weights for anyway,
so the context's own draft cost c_ctx (`context_cost`) is 0 and its rows cost r each, as in a
verify pass (without that pass, c_ctx = c prices their pass of their own as one draft step: the k
shallow layers, no exit layer, no LM head, an upper bound). The formula above reads c_ctx for the
context's c.
Where rows cost something, a long context draft that is rarely accepted costs more than it
brings: `best_context_length` cuts the draft to the length with the most tokens per unit of cost
(at least one token, so its acceptance keeps being observed).
The head's confidence costs a probe to know: the exit head on the block input's state, p
(`SplitModel.probe_cost`; a whole draft step, c, where that state is not computed yet). So
`choose_draft_source` is asked twice: first without a confidence (the head's best case, confidence
1), and only when the head could win is the probe run and the rule asked again with the measured
confidence. That probe is paid whether the head then wins or not (on SmolLM2 at k = 4, most of the head's draft steps in a
Spec-Bench run drafted nothing: `benchmarks/head_steps.py`), so it runs only when it is worth its
cost (`worth_probing`): with the request's running rate of probes the head won, w, when
w * head-best-case + (1 - w) * the context's value with the probe's cost added beats the
context's value; every `ContextStats.probe_every` blocks a probe runs anyway, so w keeps being
observed. A tie goes to the context. With the costs fixed (counted, or timed once per process on
native weights) everything is a deterministic function of the decoded tokens, so a seeded run
reproduces within a process, and the choice only changes the proposal, never what the verifier
accepts: decoding stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.core.adaptive_gamma import expected_tokens
from common.core.vocabulary import CONTEXT_DRAFT, EXIT_HEAD_DRAFT

CONTEXT = CONTEXT_DRAFT
HEAD = EXIT_HEAD_DRAFT


def context_value(tokens: int, acceptance: float, draft_cost: float, row_cost: float = 0.0) -> float:
    """Expected committed tokens per unit of cost of a context draft of `tokens` tokens."""
    return expected_tokens(acceptance, tokens) / (1.0 + draft_cost + tokens * row_cost)


def best_context_length(tokens: int, acceptance: float, draft_cost: float, row_cost: float) -> int:
    """The length in [1, tokens] (tokens >= 1) with the highest `context_value`; the shortest on ties."""
    if tokens < 1:
        raise ValueError(f"a context draft has at least one token, got {tokens}")
    values = [context_value(n, acceptance, draft_cost, row_cost) for n in range(1, tokens + 1)]
    return 1 + max(range(tokens), key=lambda i: (values[i] - 1e-12 * i))


def head_value(gamma: int, first_acceptance: float, acceptance: float, draft_cost: float, row_cost: float = 0.0) -> float:
    """Expected committed tokens per unit of cost of an exit-head draft of `gamma` tokens whose first
    token is accepted with `first_acceptance` and every later one with `acceptance`."""
    if gamma <= 0:
        return 1.0
    return (1.0 + first_acceptance * expected_tokens(acceptance, gamma - 1)) / (1.0 + gamma * (draft_cost + row_cost))


def choose_draft_source(
    context_tokens: int,
    context_acceptance: float,
    head_gamma: int,
    head_acceptance: float,
    head_confidence: float | None,
    draft_cost: float,
    confidence_threshold: float = 0.0,
    row_cost: float = 0.0,
    context_cost: float | None = None,
) -> str:
    """CONTEXT or HEAD for the next block (see the module docstring for the values compared).

    context_tokens: L, tokens the context proposes (0: no match); context_acceptance: a_ctx for the
    match's n-gram length; head_gamma: g, the most the exit head may draft (0: it is off);
    head_acceptance: a_head; head_confidence: the head's top-1 probability for the first token,
    None when not measured (then its best case, 1.0); confidence_threshold: below it the head
    drafts nothing, so the context wins; draft_cost / row_cost: c and r above; context_cost: c_ctx,
    what drafting the context's rows adds besides their verify rows (None: one draft step, c). Ties
    go to the context.
    """
    for name, value in (("context_acceptance", context_acceptance), ("head_acceptance", head_acceptance)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if context_tokens <= 0:
        return HEAD
    if head_gamma <= 0:
        return CONTEXT
    confidence = 1.0 if head_confidence is None else head_confidence
    if confidence < confidence_threshold:
        return CONTEXT
    first = 0.5 * (confidence + head_acceptance)
    head = head_value(head_gamma, first, head_acceptance, draft_cost, row_cost)
    context_cost = draft_cost if context_cost is None else context_cost
    return HEAD if head > context_value(context_tokens, context_acceptance, context_cost, row_cost) else CONTEXT


def worth_probing(
    context_tokens: int, context_acceptance: float, head_gamma: int, head_acceptance: float, draft_cost: float,
    row_cost: float, win_rate: float, context_cost: float | None = None, probe_cost: float | None = None,
) -> bool:
    """Is running the head's first draft step, to learn its confidence, worth that step's cost?

    win_rate: how often such a probe handed the block to the head; context_cost: c_ctx (None: one
    draft step); probe_cost: p (None: one draft step). The probe pays off when win_rate * (the
    head's best case) + (1 - win_rate) * (the context's value with the probe's cost added) exceeds
    the context's value without the probe (see the module docstring)."""
    context_cost = draft_cost if context_cost is None else context_cost
    probe_cost = draft_cost if probe_cost is None else probe_cost
    best = head_value(head_gamma, 0.5 * (1.0 + head_acceptance), head_acceptance, draft_cost, row_cost)
    context = context_value(context_tokens, context_acceptance, context_cost, row_cost)
    after_probe = context_value(context_tokens, context_acceptance, context_cost + probe_cost, row_cost)  # the probe paid too
    return win_rate * best + (1.0 - win_rate) * after_probe > context


@dataclass
class ContextStats:
    """One request's running acceptance of context drafts, per matched n-gram length (an EMA per
    drafted token up to the block's first rejection, as `DraftStats` keeps the exit head's)."""

    prior: float = 0.5
    decay: float = 0.9
    acceptance: dict[int, float] = field(default_factory=dict)
    probe_wins: float | None = None
    """EMA of probes of the head's confidence that handed the block to the head (None: `prior`)."""
    probe_every: int = 16
    since_probe: int = 0

    @property
    def win_rate(self) -> float:
        return self.prior if self.probe_wins is None else self.probe_wins

    def probe_due(self) -> bool:
        """True every `probe_every` blocks that could have probed without one, to keep `win_rate` observed."""
        return self.since_probe + 1 >= self.probe_every

    def observe_probe(self, probed: bool, head_won: bool = False) -> None:
        """A block that could have probed the head's confidence: whether it did, and if so whether the head won."""
        if not probed:
            self.since_probe += 1
            return
        self.since_probe = 0
        self.probe_wins = self.decay * self.win_rate + (1.0 - self.decay) * float(head_won)

    def estimate(self, ngram: int) -> float:
        """a_ctx for a match of length `ngram` (the prior before any such block)."""
        return self.acceptance.get(ngram, self.prior)

    def observe_block(self, ngram: int, drafted: int, accepted: int) -> None:
        """A context block matched on `ngram` tokens drafted `drafted`, of which the first `accepted` were kept."""
        for outcome in [1.0] * accepted + ([0.0] if accepted < drafted else []):
            self.acceptance[ngram] = self.decay * self.estimate(ngram) + (1.0 - self.decay) * outcome
