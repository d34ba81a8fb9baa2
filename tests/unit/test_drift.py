"""DriftGuard verdicts and ArFallback transitions, with hand-computed numbers."""

from __future__ import annotations

import pytest

from common.observe.drift import (
    ArFallback,
    ArFallbackConfig,
    DriftDecision,
    DriftGuard,
    DriftGuardConfig,
    break_even_tau,
    kl_slope,
)
from common.decoding.speculative import GenerationResult

# ---- break-even ---------------------------------------------------------------------------------


def test_break_even_tau_numbers():
    # 1 + gamma (k + e) / L
    assert break_even_tau(8, 30, 5) == pytest.approx(1 + 5 * 9 / 30)  # 2.5
    assert break_even_tau(8, 30, 0) == pytest.approx(1.0)  # gamma 0 is AR: costs exactly one step
    assert break_even_tau(4, 32, 3, exit_cost_layers=2) == pytest.approx(1 + 3 * 6 / 32)  # 1.5625
    # a verifier pass over gamma + 1 positions costing 1.5 AR steps in the deep part:
    # (gamma (k + e) + k + v (L - k)) / L = (5*9 + 8 + 1.5*22) / 30 = 86 / 30
    assert break_even_tau(8, 30, 5, verify_cost=1.5) == pytest.approx(86 / 30)
    assert ArFallbackConfig().break_even_tau == pytest.approx(break_even_tau(8, 30, 5))
    assert ArFallbackConfig.for_model(8, 30, 5, window=4).break_even_tau == pytest.approx(2.5)
    with pytest.raises(ValueError, match="exit_layer"):
        break_even_tau(30, 30, 5)


# ---- drift guard --------------------------------------------------------------------------------


def _guard(**kw) -> DriftGuard:
    return DriftGuard(DriftGuardConfig(**{"margin": 0.1, "window": 100, "min_baseline_tokens": 50, **kw}))


def test_rollback_fires_after_the_window_when_acceptance_drops_by_more_than_margin():
    guard = _guard()
    assert guard.observe(1, 200, 160) is None  # v1: 0.8, good (first version)
    assert guard.observe(2, 50, 30) is None  # v2: 0.6 so far, but 50 < window: no verdict yet
    assert not guard.is_blocked(2)
    decision = guard.observe(2, 50, 30)  # 100 drafted at 60/100 = 0.6 < 0.8 - 0.1
    assert decision == DriftDecision("rollback", bad_version=2, good_version=1, before=0.8, after=0.6, drafted=100)
    assert guard.is_blocked(2) and not guard.is_blocked(1)
    assert guard.good_version() == 1
    assert guard.rollbacks == [decision]
    # judged once: more bad tokens under v2 do not produce a second decision
    assert guard.observe(2, 100, 0) is None


def test_no_rollback_on_a_good_version_or_within_margin():
    guard = _guard()
    guard.observe(1, 200, 160)  # 0.8
    assert guard.observe(2, 100, 75) is None  # 0.75 >= 0.8 - 0.1: good
    assert guard.good_version() == 2
    # v3 is judged against v2 (0.75): 0.66 >= 0.65 is within margin
    assert guard.observe(3, 100, 66) is None
    # v4 against v3 (0.66): 0.55 < 0.56 rolls back to 3
    decision = guard.observe(4, 100, 55)
    assert decision is not None and (decision.bad_version, decision.good_version) == (4, 3)


def test_next_version_after_a_rollback_is_judged_against_the_good_one():
    guard = _guard()
    guard.observe(1, 200, 160)  # 0.8
    assert guard.observe(2, 100, 10) is not None  # rolled back to 1
    guard.observe(1, 100, 80)  # the actor serves v1 again
    assert guard.observe(3, 100, 78) is None  # 0.78 vs v1's 0.8: good (v2 is never a baseline)
    assert guard.good_version() == 3


def test_no_baseline_means_no_verdict():
    guard = _guard(min_baseline_tokens=500)
    guard.observe(1, 200, 160)  # too few tokens to be a baseline
    assert guard.observe(2, 100, 0) is None
    assert not guard.is_blocked(2)


def test_ema_weights_by_tokens_and_change_after_broadcast():
    guard = _guard(ema_tokens=100.0)
    guard.observe(1, 100, 100)  # first observation sets the EMA: 1.0
    guard.observe(1, 100, 0)  # w = 1 - e^-1 = 0.6321: 1.0 + 0.6321 (0 - 1.0) = 0.3679
    assert guard.ema_by_version()[1] == pytest.approx(0.36788, abs=1e-4)
    assert guard.acceptance_by_version() == {1: 0.5}
    assert guard.change_after_broadcast(1) is None  # nothing earlier
    guard.observe(2, 50, 40)  # v2 EMA 0.8
    assert guard.change_after_broadcast(2) == pytest.approx(0.8 - 0.36788, abs=1e-4)
    assert guard.change_after_broadcast(3) is None
    guard.observe(3, 0, 0)  # AR blocks carry no acceptance information
    assert 3 not in guard.ema_by_version()


def test_kl_slope_is_the_least_squares_slope_per_step():
    # x = 0, 1, 2, 3 (mean 1.5), y = 1.0, 0.9, 0.7, 0.6 (mean 0.8):
    # cov = (-1.5)(0.2) + (-0.5)(0.1) + (0.5)(-0.1) + (1.5)(-0.2) = -0.7; var = 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert kl_slope([0, 1, 2, 3], [1.0, 0.9, 0.7, 0.6]) == pytest.approx(-0.14)
    assert kl_slope([10, 12], [0.5, 0.9]) == pytest.approx(0.2)  # drifting apart: > 0
    assert kl_slope([5, 6, 7], [0.3, float("nan"), 0.5]) == pytest.approx(0.1)  # a skipped step is left out
    assert kl_slope([3], [0.4]) is None and kl_slope([2, 2], [0.1, 0.5]) is None and kl_slope([], []) is None
    with pytest.raises(ValueError, match="same length"):
        kl_slope([1, 2], [0.1])


def test_old_versions_are_forgotten_but_the_good_one_and_blocks_stay():
    guard = _guard(max_versions=3)
    guard.observe(1, 200, 160)  # good
    assert guard.observe(2, 100, 10) is not None  # blocked
    for v in (3, 4, 5):
        guard.observe(v, 10, 8)  # below the window: unjudged
    assert sorted(guard.drafted_by_version()) == [1, 4, 5]  # v1 kept as the good baseline
    assert guard.is_blocked(2)
    assert guard.observe(5, 100, 60) is not None  # still judged against v1: 0.62 < 0.8 - 0.1


def test_bad_inputs_raise():
    guard = _guard()
    with pytest.raises(ValueError, match="accepted"):
        guard.observe(1, 1, 2)
    with pytest.raises(ValueError, match="margin"):
        DriftGuardConfig(margin=0.0)


# ---- AR fallback --------------------------------------------------------------------------------


def _run_block(policy: ArFallback, result: GenerationResult, gamma: int, accept: int | None) -> int:
    """Ask the policy, then fake one block: `accept` drafts accepted (None: all), plus one token."""
    g = policy(result, gamma)
    n = g if accept is None else min(accept, g)
    result.verifier_passes += 1
    result.drafted += g
    result.accepted += n
    result.token_ids.extend([0] * (n + 1))
    return g


def test_fallback_engages_on_a_drafter_never_accepted_and_releases_when_probes_succeed():
    cfg = ArFallbackConfig(break_even_tau=2.0, window=4, probe_every=3, release_probes=2)
    policy = ArFallback(cfg)
    gammas = []
    for _ in range(3):  # three requests of 3 blocks each, nothing accepted: tau = 1 per block
        result = GenerationResult(prompt_ids=[1])
        gammas += [_run_block(policy, result, 5, accept=0) for _ in range(3)]
    # Blocks are observed one call later. The 4th drafting block is seen at the 5th call (the
    # final block of request 1 is counted when request 2 starts), so the 5th call returns 0.
    assert gammas[:5] == [5, 5, 5, 5, 0]
    assert policy.active
    (event,) = policy.pop_events()
    assert (event.kind, event.tau, event.break_even, event.blocks) == ("ar_fallback", 1.0, 2.0, 4)
    # under fallback every 3rd block is a probe with the request's gamma
    assert gammas[5:] == [0, 5, 0, 0]

    # the drafter improves: probes accept everything (tau 6). The call-7 probe (tau 1) and the
    # first new probe (tau 6) average 3.5 > 2, so the second probe releases.
    result = GenerationResult(prompt_ids=[1])
    gammas = [_run_block(policy, result, 5, accept=None) for _ in range(6)]
    assert gammas == [5, 5, 5, 5, 5, 5]  # call 10 probes; seen at call 11: released
    assert not policy.active
    (event,) = policy.pop_events()
    assert (event.kind, event.tau, event.blocks) == ("ar_release", 3.5, 6)
    assert policy.pop_events() == []
    # the EMA restarts at 3.5 and takes 4 blocks of tau 6 with alpha = 2 / (4 + 1) = 0.4:
    # 6 - (6 - 3.5) * 0.6**4
    assert policy.tau_ema == pytest.approx(6 - 2.5 * 0.6**4)


def test_failed_probes_keep_fallback():
    cfg = ArFallbackConfig(break_even_tau=2.0, window=2, probe_every=2, release_probes=1)
    policy = ArFallback(cfg)
    result = GenerationResult(prompt_ids=[1])
    gammas = [_run_block(policy, result, 4, accept=0) for _ in range(12)]
    assert policy.active
    assert gammas[:3] == [4, 4, 0]
    assert gammas[3:] == [4, 0] * 4 + [4]  # probe every 2nd block, never released


def test_good_drafter_never_falls_back_and_ema_tracks_tau():
    policy = ArFallback(ArFallbackConfig(break_even_tau=2.0, window=3))
    result = GenerationResult(prompt_ids=[1])
    for _ in range(20):
        assert _run_block(policy, result, 4, accept=3) == 4  # tau = 4
    assert not policy.active and policy.events == []
    assert policy.tau_ema == pytest.approx(4.0)


def test_interleaved_requests_get_their_own_deltas():
    policy = ArFallback(ArFallbackConfig(break_even_tau=2.0, window=100))
    a, b = GenerationResult(prompt_ids=[1]), GenerationResult(prompt_ids=[2])
    for _ in range(5):
        _run_block(policy, a, 4, accept=4)  # tau 5
        _run_block(policy, b, 4, accept=0)  # tau 1
    # 9 blocks observed so far (b's last not yet); both kinds count, none twice
    assert policy._blocks == 9


def test_gamma_zero_requests_pass_through_and_probe_now():
    cfg = ArFallbackConfig(break_even_tau=2.0, window=1, probe_every=50)
    policy = ArFallback(cfg)
    result = GenerationResult(prompt_ids=[1])
    assert _run_block(policy, result, 0, accept=0) == 0  # an AR request is never counted
    _run_block(policy, result, 3, accept=0)
    assert _run_block(policy, result, 3, accept=0) == 0 and policy.active
    policy.probe_now()
    assert _run_block(policy, result, 3, accept=0) == 3
