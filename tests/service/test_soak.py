"""The short CI version of the fault-injection soak (benchmarks/soak.py, issue 14).

One run on stories260K with 2 actors and 30 requests, a private redis-server killed (kill -9)
and restarted on its AOF, the learner and one actor SIGKILLed, poison entries and every kind of
forged weights mixed in. No request fails, no forged version is ever served, every poison entry
is dead-lettered, and produced = applied + dead-lettered + counted as lost.
"""

from __future__ import annotations

import pytest

from tests.helpers import load_benchmark

pytestmark = pytest.mark.slow

soak = load_benchmark("soak")


def test_short_soak_serves_through_every_fault_and_accounts_for_everything(tmp_path):
    report = soak.run_soak(soak.SoakConfig(out=tmp_path, work=tmp_path / "work", requests=30, actors=2, redis_restarts=1, outage_s=1.5,
                                           learner_kills=1, actor_kills=1, poison=8, forgeries=5,
                                           max_new_tokens=16))
    kinds = [e["kind"] for e in report["faults"]]
    assert kinds.count("redis killed (kill -9)") == 1 and kinds.count("redis restarted on its AOF") == 1
    assert "learner killed" in kinds and "actor killed" in kinds
    assert report["requests_failed"] == 0 and report["requests_served"] == 30
    assert report["invariant_holds"], report
    assert report["poison_injected"] == 8 and report["poison_dead_lettered"] == 8
    assert report["forgeries_injected"] == 5 and report["forgeries_served"] == 0
    assert report["versions_published"] >= 1
    assert (tmp_path / "soak.md").read_text().startswith("| measure | value |")
