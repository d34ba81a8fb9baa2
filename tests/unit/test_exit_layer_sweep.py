"""benchmarks/exit_layer_sweep.py: one row per exit layer from a `dvi bench speed --learn` report."""

import pytest

from tests.helpers import load_benchmark

sweep = load_benchmark("exit_layer_sweep")


def _row(method, category, tps, speedup, tau, identical=1.0):
    return {"method": method, "category": category, "tokens_per_s": tps, "speedup_vs_hf_ar": speedup,
            "mean_accepted": tau, "identical_to_ar": identical}


def _report(drafted=40, accepted=10, identical=1.0):
    return {
        "settings": {"learning": {"schedules": {"kl-only": {"drafted": drafted, "accepted": accepted}}}},
        "runs": [
            _row("hf_ar", "overall", 10.0, 1.0, 1.0),
            _row("dvi_untrained", "overall", 12.0, 1.2, 1.5),
            _row("dvi_kl-only", "overall", 15.0, 1.5, 2.0, identical),
            _row("dvi_kl-only", "qa", 99.0, 9.9, 9.0),  # per-category rows are not the layer's figure
        ],
    }


def test_layer_row_takes_the_overall_rows_and_the_learning_acceptance():
    row = sweep.layer_row(6, _report(identical=0.5), "kl-only")
    assert row == {
        "exit_layer": 6, "learning_drafted": 40, "learning_acceptance": 0.25, "tau": 2.0, "tokens_per_s": 15.0,
        "speedup_vs_hf_ar": 1.5, "untrained_speedup_vs_hf_ar": 1.2, "identical_to_ar": 0.5,
    }


def test_layer_row_without_drafts_has_no_acceptance_and_the_table_says_so():
    row = sweep.layer_row(2, _report(drafted=0, accepted=0), "kl-only")
    assert row["learning_acceptance"] is None
    table = sweep.markdown([row], "kl-only")
    assert table.splitlines()[-1].startswith("| 2 | n/a | 2.000 | 15.0 | 1.50 | 1.20 | 1.00 |")


def test_a_missing_schedule_is_a_key_error_not_a_silent_row():
    with pytest.raises(KeyError):
        sweep.layer_row(4, _report(), "kl-rl")
