"""The monitor frame is a pure function of a TelemetryState."""

from __future__ import annotations

from rich.console import Console

from common.transport.redis.telemetry import Event, HistoryRow, TelemetryState
from dvi.monitor import SPARK, demo_state, render, series, sparkline

NOW = 1_760_000_000.0


def _text(renderable, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def _state() -> TelemetryState:
    history = []
    for i in range(40):
        t = NOW - 400 + 10 * i
        history.append(HistoryRow(f"{int(t * 1000)}-0", t, "actor:gen-0", {"tau": 1.0 + i / 20, "acceptance": i / 40}))
        history.append(HistoryRow(f"{int(t * 1000)}-1", t + 1, "learner", {"kl": 1.0 / (1 + i), "stream_length": i}))
    return TelemetryState(
        actors={
            "gen-0": {"version": 17, "version_lag": 0, "tokens_per_s": 31.2, "tau": 2.95, "acceptance": 0.97,
                      "acceptance_by_position": [0.99, 0.9, 0.5], "gamma": 5, "ar_fallback": 0, "requests": 12,
                      "rollbacks": 0, "t": NOW - 2},
            "gen-1": {"version": 16, "version_lag": 1, "tokens_per_s": 20.0, "tau": 1.0, "acceptance": 0.0,
                      "gamma": 0, "ar_fallback": 1, "requests": 3, "rollbacks": 2, "t": NOW - 300},
        },
        learner={"step": 4321, "phase": "mixed", "version": 17, "kl": 0.0123, "stream_length": 42, "pending": 7,
                 "dead_lettered": 3, "t": NOW - 1},
        events=[
            Event("1-0", "weights_published", NOW - 50, {"version": 17, "step": 4300}),
            Event("2-0", "rollback", NOW - 40, {"actor": "gen-1", "bad_version": 17, "good_version": 16}),
            Event("3-0", "ar_fallback", NOW - 30, {"actor": "gen-1", "tau_ema": 1.2}),
        ],
        history=history,
        namespace="unit",
        read_at=NOW,
    )


def test_sparkline_and_series_numbers():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == SPARK
    assert sparkline([None, 1.0, 1.0]) == " ▁▁"  # no data is blank; flat is the lowest glyph
    assert sparkline([0.5], 0.0, 1.0) == "▅"  # int(0.5 * 8) = 4 -> the 5th glyph
    rows = [HistoryRow(f"{i}-0", float(i), "actor:a", {"tau": float(i)}) for i in range(4)]
    rows.append(HistoryRow("9-0", 3.0, "learner", {"tau": 100.0}))
    # 4 points over t in [0, 3], 2 buckets: [0, 1.5) -> mean(0, 1), [1.5, 3] -> mean(2, 3)
    assert series(rows, "tau", "actor", 2) == [0.5, 2.5]
    assert series(rows, "tau", "actor:a", 4) == [0.0, 1.0, 2.0, 3.0]
    assert series(rows, "tau", "actor:b", 3) == [None, None, None]


def test_render_shows_actors_versions_sparklines_and_rollbacks():
    text = _text(render(_state()))
    assert "gen-0" in text and "gen-1" in text
    assert "4,321" in text and "mixed" in text  # learner step and phase
    assert " 17 " in text and " 16 " in text  # actor versions
    assert "AR" in text and "spec" in text
    assert "rollback" in text and "bad_version=17" in text
    assert "ar_fallback" in text
    assert "last broadcast" in text and "version=17" in text
    assert sum(text.count(g) for g in SPARK) > 40  # the history sparklines
    assert "tau" in text and "acceptance" in text and "kl" in text
    assert "5m" in text  # gen-1 was last seen 300 s ago
    # a narrow terminal keeps the essential columns
    narrow = _text(render(_state()), width=80)
    assert "gen-1" in narrow and "rollbacks" in narrow and "tau trend" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80


def test_render_empty_state():
    text = _text(render(TelemetryState(namespace="empty", read_at=NOW)))
    assert "learner: no telemetry yet" in text and "none publishing in namespace 'empty'" in text


def test_demo_state_renders_its_story():
    state = demo_state()
    kinds = {e.kind for e in state.events}
    assert {"rollback", "ar_fallback", "ar_release", "weights_published", "dead_letter"} <= kinds
    assert len(state.actors) == 3 and 100 < len(state.history) <= 500
    text = _text(render(state))
    assert "a0" in text and "rollback" in text


def test_an_actor_row_shows_redis_outages_held_and_lost_trajectories():
    state = _state()
    first, second = sorted(state.actors)
    state.actors[first].update(redis_ok=0, outbox=5, redis_outages=1, trajectories_lost=0)
    state.actors[second].update(redis_ok=1, outbox=0, redis_outages=2, trajectories_lost=3)
    text = _text(render(state), width=160)
    assert f"{first} redis down (5 held)" in text and f"{second} redis x2 3 lost" in text
