"""The draft-source rule (common/core/arbitration.py), with the arithmetic written out by hand."""

from __future__ import annotations

import pytest

from common.core.arbitration import (
    CONTEXT, HEAD, ContextStats, best_context_length, choose_draft_source, context_value, head_value, worth_probing,
)

COST = 0.2  # one draft step = 0.2 verifier passes


def test_values_by_hand():
    # context, 3 tokens at a = 0.5: (1 + .5 + .25 + .125) / (1 + .2) = 1.875 / 1.2
    assert context_value(3, 0.5, COST) == pytest.approx(1.5625)
    # head, g = 2, first token 0.9, then 0.5: (1 + .9 * (1 + .5)) / (1 + 2 * .2) = 2.35 / 1.4
    assert head_value(2, 0.9, 0.5, COST) == pytest.approx(2.35 / 1.4)
    assert head_value(0, 0.9, 0.9, COST) == 1.0


def test_values_count_every_drafted_token_as_a_verify_row():
    # row cost 0.2: context, 3 tokens at 0.5: 1.875 / (1 + .2 + 3 * .2) = 1.875 / 1.8
    assert context_value(3, 0.5, COST, 0.2) == pytest.approx(1.875 / 1.8)
    # head, g = 2, first 0.9, then 0.5: 2.35 / (1 + 2 * (.2 + .2)) = 2.35 / 1.8
    assert head_value(2, 0.9, 0.5, COST, 0.2) == pytest.approx(2.35 / 1.8)


def test_a_context_draft_is_cut_to_the_length_that_pays():
    # a = 0.5, c = r = 0.2: L1 1.5/1.4 = 1.071, L2 1.75/1.6 = 1.094, L3 1.875/1.8 = 1.042, L4 0.969, L5 0.895
    assert best_context_length(5, 0.5, COST, 0.2) == 2
    assert best_context_length(5, 0.5, COST, 0.0) == 5  # free rows: every token adds value
    # a = 0.9: L4 4.0951/2.0 = 2.048 < L5 4.68559/2.2 = 2.130
    assert best_context_length(5, 0.9, COST, 0.2) == 5
    assert best_context_length(5, 0.1, COST, 0.2) == 1  # never below one token: its acceptance stays observed
    assert best_context_length(1, 0.1, COST, 0.2) == 1
    with pytest.raises(ValueError):
        best_context_length(0, 0.5, COST, 0.2)


def test_costly_rows_move_a_block_from_the_head_to_the_context():
    # context 1 token at 0.5; head g = 3, confidence 0.7, history 0.5 -> first 0.6, E = 1 + .6 * 1.75 = 2.05
    # free rows: context 1.5/1.2 = 1.25 < head 2.05/1.6 = 1.281
    assert choose_draft_source(1, 0.5, 3, 0.5, 0.7, COST) == HEAD
    # rows at 0.2: context 1.5/1.4 = 1.071 > head 2.05/2.2 = 0.932
    assert choose_draft_source(1, 0.5, 3, 0.5, 0.7, COST, row_cost=0.2) == CONTEXT


def test_a_long_context_match_wins():
    # context: 5 tokens at 0.8 -> (1 + .8 + .64 + .512 + .4096 + .32768) / 1.2 = 4.68928 / 1.2 = 3.908
    # head at its best (confidence 1, history 0.6, g = 5): first 0.8 -> (1 + .8 * 2.3056) / 2 = 1.422
    assert choose_draft_source(5, 0.8, 5, 0.6, None, COST) == CONTEXT
    assert choose_draft_source(5, 0.8, 5, 0.6, 0.99, COST) == CONTEXT


def test_a_weak_one_token_match_with_poor_history_loses_to_a_confident_head():
    # context: 1 token at 0.2 -> (1 + .2) / 1.2 = 1.0
    # head: g = 3, confidence 0.9, history 0.7 -> first .8: (1 + .8 * (1 + .7 + .49)) / 1.6 = 2.752 / 1.6 = 1.72
    assert choose_draft_source(1, 0.2, 3, 0.7, 0.9, COST) == HEAD
    # the same head unsure of this token (confidence 0.3 < threshold 0.5) drafts nothing: context
    assert choose_draft_source(1, 0.2, 3, 0.7, 0.3, COST, confidence_threshold=0.5) == CONTEXT
    # and the same weak match with a good history (0.9): (1 + .9) / 1.2 = 1.583 < 1.72, still the head;
    # with a 4-token continuation at 0.9: (1 + .9 + .81 + .729 + .6561) / 1.2 = 3.40 > 1.72: context
    assert choose_draft_source(1, 0.9, 3, 0.7, 0.9, COST) == HEAD
    assert choose_draft_source(4, 0.9, 3, 0.7, 0.9, COST) == CONTEXT


def test_no_head_means_context_and_no_context_means_head():
    for confidence in (None, 0.0, 1.0):
        assert choose_draft_source(1, 0.0, 0, 1.0, confidence, COST) == CONTEXT  # gamma 0: the head is off
        assert choose_draft_source(0, 1.0, 4, 0.0, confidence, COST) == HEAD  # nothing to look up


def test_ties_go_to_the_context_deterministically():
    # context: 1 token at 0.5 -> 1.5 / 1.2 = 1.25; head: g = 1, confidence 0.5, history 0.5, cost 0.2
    # -> first 0.5: (1 + .5) / 1.2 = 1.25: a tie
    assert context_value(1, 0.5, COST) == head_value(1, 0.5, 0.5, COST)
    assert {choose_draft_source(1, 0.5, 1, 0.5, 0.5, COST) for _ in range(5)} == {CONTEXT}


def test_bad_acceptance_is_refused():
    with pytest.raises(ValueError, match="context_acceptance"):
        choose_draft_source(1, 1.5, 1, 0.5, None, COST)


def test_context_stats_keep_one_history_per_match_length():
    stats = ContextStats(prior=0.5, decay=0.5)
    stats.observe_block(ngram=1, drafted=3, accepted=1)  # outcomes 1, 0: 0.5 -> 0.75 -> 0.375
    assert stats.estimate(1) == pytest.approx(0.375)
    assert stats.estimate(3) == 0.5  # untouched: the prior
    stats.observe_block(ngram=3, drafted=2, accepted=2)  # outcomes 1, 1: 0.5 -> 0.75 -> 0.875
    assert stats.estimate(3) == pytest.approx(0.875)


def test_the_ablation_switches_arbitration_off_alone():
    from common.core.config import DecodeConfig
    from dvi.bench.ablation import variants

    rows = {v.lever: v for v in variants(DecodeConfig(), 8192)}
    assert rows[None].decode.arbitrate is True
    assert rows["arbitration"].decode == DecodeConfig(arbitrate=False)  # everything else as the full method
    assert rows["shared_pass"].decode == DecodeConfig(shared_shallow_pass=False)
    assert rows["traffic"].decode == DecodeConfig(traffic_drafting=False)


def test_the_heads_confidence_is_probed_only_when_the_probe_is_worth_its_cost():
    # context 1 token at 0.5: 1.5 / 1.2 = 1.25; with the probe's step paid too: 1.5 / 1.4 = 1.0714
    # head best case, g = 3, history 0.5 -> first 0.75: (1 + .75 * 1.75) / 1.6 = 1.4453
    # win rate 0.5: .5 * 1.4453 + .5 * 1.0714 = 1.2584 > 1.25; 0.4: .5781 + .6429 = 1.2210 < 1.25
    assert worth_probing(1, 0.5, 3, 0.5, COST, 0.0, 0.5)
    assert not worth_probing(1, 0.5, 3, 0.5, COST, 0.0, 0.4)


def test_context_stats_keep_the_probe_win_rate_and_force_a_probe_now_and_then():
    stats = ContextStats(probe_every=3)
    assert stats.win_rate == 0.5 and not stats.probe_due()
    stats.observe_probe(True, head_won=False)
    assert stats.win_rate == pytest.approx(0.45)  # 0.9 * 0.5 + 0.1 * 0
    stats.observe_probe(False)
    assert not stats.probe_due()
    stats.observe_probe(False)
    assert stats.probe_due()  # the third block without a probe probes anyway
    stats.observe_probe(True, head_won=True)
    assert stats.win_rate == pytest.approx(0.9 * 0.45 + 0.1) and not stats.probe_due()


def test_a_context_draft_that_shares_the_input_pass_costs_its_rows_alone():
    # context 1 token at 0.5: 1.5 / (1 + c_ctx): 1.25 at one draft step (0.2), 1.5 at 0
    # head g = 1, confidence 0.7, history 0.5 -> first 0.6: 1.6 / 1.2 = 1.3333
    assert choose_draft_source(1, 0.5, 1, 0.5, 0.7, COST) == HEAD  # c_ctx defaults to a draft step
    assert choose_draft_source(1, 0.5, 1, 0.5, 0.7, COST, context_cost=COST) == HEAD
    assert choose_draft_source(1, 0.5, 1, 0.5, 0.7, COST, context_cost=0.0) == CONTEXT


def test_a_free_context_draft_is_not_worth_a_probe_the_head_cannot_win():
    # context 1 token at 0.5, c_ctx 0: 1.5; after a probe (c_ctx + c = 0.2): 1.25
    # head best case, g = 3, history 0.5: 1.4453 < 1.5, so even a sure win does not pay the probe
    assert worth_probing(1, 0.5, 3, 0.5, COST, 0.0, 0.5)  # c_ctx = c: the test above
    assert not worth_probing(1, 0.5, 3, 0.5, COST, 0.0, 1.0, context_cost=0.0)
    # a poor context (1 token at 0.1): 1.1 unprobed, 1.1 / 1.2 = 0.9167 after; win rate 0.5:
    # .5 * 1.4453 + .5 * .9167 = 1.1810 > 1.1
    assert worth_probing(1, 0.1, 3, 0.5, COST, 0.0, 0.5, context_cost=0.0)


def test_a_probe_that_reads_a_computed_state_costs_the_exit_head_alone():
    # context 1 token at 0.3, c_ctx 0: 1.3 unprobed; after a probe of p: 1.3 / (1 + p)
    # head best case 1.4453 (g = 3, history 0.5); win rate 0.2:
    #   p = c = 0.2:  .2 * 1.4453 + .8 * 1.0833 = 1.1558 < 1.3
    #   p = 0.05:     .2 * 1.4453 + .8 * 1.2381 = 1.2795 < 1.3;  win rate 0.3: .4336 + .8667 = 1.3003 > 1.3
    assert not worth_probing(1, 0.3, 3, 0.5, COST, 0.0, 0.2, context_cost=0.0)
    assert not worth_probing(1, 0.3, 3, 0.5, COST, 0.0, 0.2, context_cost=0.0, probe_cost=0.05)
    assert worth_probing(1, 0.3, 3, 0.5, COST, 0.0, 0.3, context_cost=0.0, probe_cost=0.05)
    assert not worth_probing(1, 0.3, 3, 0.5, COST, 0.0, 0.3, context_cost=0.0)  # p defaults to a draft step
