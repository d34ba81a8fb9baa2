"""Adaptive gamma: the expected-rate rule by hand, and the running estimates behind it."""

import pytest

from common.adaptive_gamma import DraftStats, best_gamma, expected_tokens


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_best_gamma_by_hand():
    # verify 10, draft 2: a = 0.5 -> rates g0 1/10, g1 1.5/12 = .125, g2 1.75/14 = .125, g3 1.875/16 = .117
    assert best_gamma(0.5, 2.0, 10.0, 5) == 1  # ties go to the smaller gamma
    assert best_gamma(0.0, 2.0, 10.0, 5) == 0  # a drafter that is never right: do not draft
    assert best_gamma(1.0, 0.1, 10.0, 5) == 5  # always right and nearly free: draft all
    assert best_gamma(0.9, 2.0, 10.0, 0) == 0
    with pytest.raises(ValueError):
        best_gamma(1.5, 1.0, 1.0, 3)


def test_draft_stats_learn_costs_and_acceptance_and_probe():
    stats = DraftStats(prior=0.5, decay=0.5, probe_every=3)
    assert stats.gamma(4) == 4  # costs unknown: draft up to gamma
    stats.observe_block(steps=2, drafted=2, accepted=0, draft_seconds=4.0, verify_seconds=10.0)
    assert stats.draft_seconds == 2.0 and stats.verify_seconds == 10.0
    assert stats.acceptance == pytest.approx(0.25)  # 0.5 -> one rejection at decay 0.5
    stats.observe_block(steps=1, drafted=1, accepted=0, draft_seconds=2.0, verify_seconds=10.0)
    assert stats.acceptance == pytest.approx(0.125)
    assert stats.gamma(4) == 0  # 1/10 beats 1.125/12
    stats.observe_block(steps=0, drafted=0, accepted=0, draft_seconds=0.0, verify_seconds=10.0)
    assert stats.gamma(4) == 0
    stats.observe_block(steps=0, drafted=0, accepted=0, draft_seconds=0.0, verify_seconds=10.0)
    assert stats.gamma(4) == 1  # third block without a draft: probe with one token
    stats.observe_block(steps=1, drafted=1, accepted=1, draft_seconds=2.0, verify_seconds=10.0)
    assert stats.since_draft == 0 and stats.acceptance == pytest.approx(0.5625)
    assert stats.gamma(0) == 0
