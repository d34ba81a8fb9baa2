"""The learner's bounded seen-id window and its count of holes in producers' numbering (issue 14)."""

from __future__ import annotations

import pytest

from learner.accounting import ProducerGaps
from learner.config import LearnerConfig
from learner.dedupe import SeenWindow
from learner.learner import Learner
from tests.helpers import make_trajectory
from tests.tiny_models import tiny_split


def test_seen_window_forgets_ids_older_than_the_window_and_caps_the_count():
    w = SeenWindow(window_versions=2, max_ids=4)
    assert w.add("a", 0) and w.add("b", 1) and not w.add("a", 5)  # a repeat, whatever its version
    assert w.prune(current_version=3) == 1 and "a" not in w and "b" in w  # 0 < 3 - 2: forgotten
    for rid, v in (("c", 3), ("d", 3), ("e", 3)):
        w.add(rid, v)
    w.add("f", 4)  # 5 ids > cap 4: the oldest version (b, v1) goes
    assert len(w) == 4 and "b" not in w and w.forgotten == 2
    restored = SeenWindow(2)
    restored.load(w.state(), default_version=0)
    assert restored.state() == w.state() == [["c", 3], ["d", 3], ["e", 3], ["f", 4]]
    restored.load(["legacy-id"], default_version=7)  # an older checkpoint's bare ids
    assert restored.state() == [["legacy-id", 7]]
    with pytest.raises(ValueError, match="pairs or ids"):
        restored.load([["x", "not a version"]], 0)


def test_the_learner_seen_window_stays_bounded_by_version_and_survives_a_checkpoint(tmp_path):
    split = tiny_split(exit_layer=2)
    learner = Learner(split, LearnerConfig(batch_tokens=16, max_staleness=2))
    for version in range(8):
        batch = [make_trajectory(n_drafted=4, hidden=32, vocab=96, k=4, seed=100 * version + i,
                                 weight_version=version, request_id=f"v{version}-{i}") for i in range(5)]
        learner.add(batch)
        assert learner.add(batch[:2]) == 0  # repeats within the window are duplicates
        learner.publish_version()
        # ids of versions below (current - max_staleness) are gone: at most 3 versions x 5 ids
        assert learner.seen_count() <= 15
    assert learner.counters()["duplicates"] == 16 and learner.counters()["added"] == 40
    learner.save_checkpoint(tmp_path / "ckpt")
    again = Learner(tiny_split(exit_layer=2), LearnerConfig(batch_tokens=16, max_staleness=2))
    again.load_checkpoint(tmp_path / "ckpt")
    assert again.seen_count() == learner.seen_count() and again.add(
        [make_trajectory(n_drafted=4, hidden=32, vocab=96, k=4, seed=700, weight_version=7, request_id="v7-0")]) == 0
    # an id older than the window is stale anyway: forgetting it changes no update
    old = make_trajectory(n_drafted=4, hidden=32, vocab=96, k=4, seed=1, weight_version=0, request_id="v0-0")
    before = again.counters()
    assert again.add([old]) == 0 and again.counters()["stale_dropped"] == before["stale_dropped"] + 1


def test_producer_gaps_count_holes_ignore_repeats_and_bound_memory():
    gaps = ProducerGaps(max_out_of_order=3)
    for n in (1, 2, 3, 3, 2):  # repeats (a retried send, a replay) change nothing
        gaps.observe("a", n)
    assert gaps.lost() == 0 and gaps.highest() == {"a": 3}
    gaps.observe("a", 6)  # 4 and 5 missing (an outbox overflow, a trim, a Redis crash)
    assert gaps.lost() == 2
    gaps.observe("a", 4)  # late, out of order: the hole shrinks
    assert gaps.lost() == 1
    gaps.observe("b", 2)
    assert gaps.lost() == 2 and gaps.highest() == {"a": 6, "b": 2}
    for n in (7, 8, 9):  # more than max_out_of_order held above the hole at 5: it is confirmed lost
        gaps.observe("a", n)
    assert gaps.lost() == 2 and gaps.state()["a"] == [9, [], 1]
    gaps.observe("a", 5)  # too late: already counted, not double-counted
    assert gaps.lost() == 2
    restored = ProducerGaps()
    restored.load(gaps.state())
    assert restored.lost() == 2 and restored.highest() == gaps.highest()
    with pytest.raises(ValueError, match="malformed"):
        restored.load({"a": [1, "x", 0]})
