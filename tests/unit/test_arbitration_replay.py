"""benchmarks/arbitration_replay.py: the replay of the decoder's block loop, on hand-computed cases."""

import pytest

from tests.helpers import load_benchmark

replay_module = load_benchmark("arbitration_replay")


def _row(prompt, output, top1=None, confidence=None, category="task", part="held"):
    return {"part": part, "category": category, "prompt": prompt, "output": output,
            "head_top1": top1 if top1 is not None else [0] * len(output),
            "head_confidence": confidence if confidence is not None else [0.0] * len(output)}


def test_context_blocks_priced_by_their_rows():
    # draft step 0.2, verify row 0.1, probe 0.1 at every length
    costs = replay_module.Costs({"64": [0.2, 0.1, 0.1]})
    row = _row([7, 1, 2, 3, 4, 5, 6, 8], [1, 2, 3, 4, 5, 6, 9])
    totals = replay_module.replay([], [row], "context", costs)
    # block 1: nothing matches 8 -> commits 1; block 2: the unigram 1 matches, acceptance prior 0.5
    # and a row at 0.1 cut the draft to 2 tokens (2, 3), both kept -> commits 2, 3, 4 at cost 1.2;
    # block 3: (2, 3, 4) matches, room for 2 -> 5, 6 kept -> commits 5, 6, 9 at cost 1.2
    assert (totals.tokens, totals.blocks) == (7, 3)
    assert totals.cost == pytest.approx(3.4)
    assert totals.head_blocks == totals.probes == 0
    twice = replay_module.replay([], [row, row], "context", costs)
    # per request: the traffic of one request is below the index's count bar (2), so the same 3
    assert twice.blocks_per_request == [3, 3] and twice.blocks == 6


def test_a_confident_right_head_drafts_what_adaptive_gamma_allows():
    costs = replay_module.Costs({"64": [0.2, 0.1, 0.1]})
    output = [20, 21, 22, 23, 24, 25]
    row = _row([10, 11], output, top1=list(output), confidence=[1.0] * 6)
    totals = replay_module.replay([], [row], "dvi", costs)
    # no context ever matches; acceptance prior 0.5 (then 0.55, 0.595) with a step + row of 0.3
    # gives gamma 1: each block drafts 1 token (one head step: p + (c - p)) and commits 2,
    # costing 1 + 0.2 + 0.1
    assert (totals.tokens, totals.blocks, totals.head_blocks) == (6, 3, 3)
    assert (totals.head_drafted, totals.head_accepted) == (3, 3)
    assert totals.cost == pytest.approx(3.9)
    # the oracles draft up to gamma = 5, not what adaptive gamma allows: one block of 5 drafts
    # commits all 6 tokens
    oracle = replay_module.replay([], [row], "oracle-stop", costs)
    assert (oracle.blocks, oracle.head_drafted, oracle.head_accepted) == (1, 5, 5)
    assert oracle.rate > totals.rate


def test_oracle_stop_drafts_past_a_low_confidence_the_confidence_stop_obeys():
    costs = replay_module.Costs({"64": [0.2, 0.1, 0.1]})
    output = [20, 21, 22, 23]
    row = _row([10, 11], output, top1=list(output), confidence=[0.9, 0.2, 0.9, 0.9])
    stop = replay_module.replay([], [row], "oracle-stop", costs)
    # it drafts the whole agreeing run, 20 21 22, and commits 23 with them: one block
    assert (stop.blocks, stop.head_drafted, stop.head_accepted) == (1, 3, 3)
    oracle = replay_module.replay([], [row], "oracle", costs)
    # the confidence stop ends every draft at 21's 0.2, so the best limit is 1: 20 (+21), then 22 (+23)
    assert (oracle.blocks, oracle.head_drafted, oracle.head_accepted) == (2, 2, 2)
    assert stop.rate > oracle.rate


def test_carried_statistics_change_nothing_on_a_first_request():
    costs = replay_module.Costs({"64": [0.2, 0.1, 0.1]})
    output = [20, 21, 22, 20, 21, 22, 24]
    row = _row([20, 21, 22, 25], output, top1=[20, 21, 0, 20, 21, 22, 24], confidence=[0.9] * 7)
    per_request = replay_module.replay([], [row], "dvi", costs)
    carried = replay_module.replay([], [row], "dvi-decoder", costs)
    assert (per_request.blocks, per_request.cost, per_request.probes) == (carried.blocks, carried.cost, carried.probes)


def test_costs_interpolate_and_clamp():
    costs = replay_module.Costs({"64": [0.2, 0.1, 0.1], "128": [0.4, 0.3, 0.1]})
    assert costs.at(10) == (0.2, 0.1, 0.1)
    assert costs.at(96) == pytest.approx((0.3, 0.2, 0.1))
    assert costs.at(4096) == (0.4, 0.3, 0.1)


def test_better_heads_and_halves():
    rows = [_row([1], [5, 6, 7, 8], top1=[5, 0, 0, 0], confidence=[0.7, 0.1, 0.1, 0.1], category=c) for c in "aab"]
    assert replay_module.agreement(rows, replay_module.better_heads(rows, 0.0)) == pytest.approx(0.25)
    made = replay_module.better_heads(rows, 1.0)
    assert replay_module.agreement(rows, made) == 1.0
    assert all(c == 0.7 for _, confidence in made for c in confidence)  # drawn from where it agreed
    sure = replay_module.better_heads(rows, 1.0, sure=0.9)
    assert all(confidence == [0.7, 0.9, 0.9, 0.9] for _, confidence in sure)
    first, second = replay_module.halves(rows)
    assert [r["category"] for r in first] == ["a", "b"] and [r["category"] for r in second] == ["a"]


def test_drafter_arguments_are_checked(tmp_path):
    assert replay_module._named_directory(f"learned={tmp_path}") == ("learned", str(tmp_path))
    for bad in ("learned", "=dir", f"learned={tmp_path / 'missing'}"):
        with pytest.raises(SystemExit):
            replay_module._named_directory(bad)


def test_recorded_drafters_are_not_recorded_again(tmp_path):
    row = _row([1], [2, 3])
    row["drafters"] = {"learned": [[2, 3], [0.9, 0.9]]}
    data = {"rows": [row]}
    # nothing is missing: no model is loaded and the cache is not rewritten
    replay_module.record_drafters(tmp_path / "cache.json", data, {"learned": str(tmp_path)})
    assert not (tmp_path / "cache.json").exists()
