"""The domain-shift measures (dvi/bench/shift.py), with hand-computed numbers."""

from __future__ import annotations

import pytest

from dvi.bench.shift import SOURCE, TARGET, RequestRecord, ShiftSettings, shift_curve, summarize, tokens_to_recover


def rec(phase, tokens, passes, drafted, accepted):
    return RequestRecord(phase, tokens, passes, drafted, accepted, 0, 0, 0)


RECORDS = [
    rec(SOURCE, 10, 5, 10, 6),   # acceptance 0.6, tau 2.0
    rec(SOURCE, 10, 5, 10, 8),   # 0.8
    rec(TARGET, 20, 10, 10, 2),  # 0.2   (tokens since the switch at its end: 20)
    rec(TARGET, 20, 10, 10, 4),  # 0.4   (40)
    rec(TARGET, 20, 10, 10, 6),  # 0.6   (60)
    rec(TARGET, 20, 8, 10, 8),   # 0.8   (80)
]


def test_curve_pools_within_a_phase_only():
    curve = shift_curve(RECORDS, window=2)
    assert [p["tokens_since_switch"] for p in curve] == [-10, 0, 20, 40, 60, 80]
    # window 2, never across the switch: request 2 stands alone (0.2), request 3 pools 2 and 3: 6/20
    assert [p["acceptance"] for p in curve] == pytest.approx([0.6, 0.7, 0.2, 0.3, 0.5, 0.7])
    assert curve[5]["tau"] == pytest.approx(40 / 18)  # (20 + 20) tokens / (10 + 8) passes


def test_recovery_to_90_percent_of_the_final_level():
    settings = ShiftSettings(prompts="p", window=2, final_fraction=0.25, recovery_fraction=0.9)
    curve = shift_curve(RECORDS, window=2)
    summary = summarize(RECORDS, curve, settings)
    # final: the last 25% of 4 target requests = the last one: 8/10 = 0.8; 90% of it = 0.72
    assert summary.final_acceptance == pytest.approx(0.8)
    assert summary.source_acceptance == pytest.approx(0.8)  # the last 25% of 2 source requests: the last one
    assert summary.first_target_acceptance == pytest.approx(0.2)
    assert summary.tokens_to_recover_acceptance is None  # the windowed curve peaks at 0.7 < 0.72
    assert tokens_to_recover(curve, "acceptance", 0.8, 0.6) == 60  # 0.5 >= 0.48 first at 60 tokens
    assert summary.target_tokens == 80
    assert tokens_to_recover(curve, "acceptance", 0.0, 0.9) is None  # nothing to recover to


def test_settings_are_checked():
    with pytest.raises(ValueError, match="same task"):
        ShiftSettings(prompts="p", source="qa", target="qa")
    with pytest.raises(ValueError, match="--to-requests must be >= 1"):
        ShiftSettings(prompts="p", to_requests=0)
