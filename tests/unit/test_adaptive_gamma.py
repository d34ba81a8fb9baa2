"""Adaptive gamma: the expected-rate rule by hand, and the running acceptance behind it."""

import pytest

from common.core.adaptive_gamma import DraftStats, best_gamma, expected_tokens


def test_expected_tokens_is_the_geometric_sum():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_best_gamma_by_hand():
    # draft cost 0.2 passes, a = 0.5: g0 1/1, g1 1.5/1.2 = 1.25, g2 1.75/1.4 = 1.25, g3 1.875/1.6 = 1.17
    assert best_gamma(0.5, 0.2, 5) == 1  # ties go to the smaller gamma
    assert best_gamma(0.0, 0.2, 5) == 0  # a drafter that is never right: do not draft
    assert best_gamma(1.0, 0.01, 5) == 5  # always right and nearly free: draft all
    assert best_gamma(0.15, 0.2, 5) == 0  # 1.15 / 1.2 < 1: below break-even
    assert best_gamma(0.9, 0.2, 0) == 0
    with pytest.raises(ValueError):
        best_gamma(1.5, 0.2, 3)


def test_best_gamma_counts_each_drafted_token_as_a_verify_row_too():
    # a = 0.5, draft 0.2 and row 0.2 passes: g0 1/1, g1 1.5/1.4 = 1.071, g2 1.75/1.8 = 0.972
    assert best_gamma(0.5, 0.2, 5, row_cost=0.2) == 1
    # a = 0.35: g1 1.35/1.4 = 0.964 < 1: rows that cost make a head below ~40% not worth asking
    assert best_gamma(0.35, 0.2, 5, row_cost=0.2) == 0
    assert best_gamma(0.35, 0.2, 5) == 1  # free rows: 1.35/1.2 = 1.125
    assert DraftStats(prior=0.35).gamma(5, 0.2, 0.2) == 0
    with pytest.raises(ValueError):
        best_gamma(0.5, 0.2, 3, row_cost=-0.1)


def test_draft_stats_track_acceptance_and_probe():
    stats = DraftStats(prior=0.5, decay=0.5, probe_every=3)
    assert stats.gamma(4, 0.2) == 1  # the prior: a = 0.5
    stats.observe_block(drafted=2, accepted=0)  # one rejection: 0.5 -> 0.25
    assert stats.acceptance == pytest.approx(0.25)
    stats.observe_block(drafted=1, accepted=0)
    assert stats.acceptance == pytest.approx(0.125)
    assert stats.gamma(4, 0.2) == 0
    stats.observe_block(drafted=0, accepted=0)
    assert stats.gamma(4, 0.2) == 0
    stats.observe_block(drafted=0, accepted=0)
    assert stats.gamma(4, 0.2) == 1  # third block without a draft: probe with one token
    stats.observe_block(drafted=1, accepted=1)  # 0.125 -> 0.5625
    assert stats.since_draft == 0 and stats.acceptance == pytest.approx(0.5625)
    assert stats.gamma(0, 0.2) == 0
