"""The terminal view of a running service: `render(TelemetryState)` -> one rich frame.

Pure: it reads only the `TelemetryState` it is given (see common/transport/redis/telemetry.py for the snapshot
keys) and the clock it is passed, so a frame is reproducible from a state. `dvi monitor` reads
the state from Redis and redraws it; `--once` prints a single frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from common.transport.redis.telemetry import HistoryRow, TelemetryState

SPARK = "▁▂▃▄▅▆▇█"
STALE_S = 60.0  # a snapshot older than this is shown dimmed with its age
EVENT_STYLES = {
    "rollback": "bold red",
    "ar_fallback": "yellow",
    "ar_release": "green",
    "dead_letter": "magenta",
    "learner_restart": "cyan",
    "weights_published": "dim",
}


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def sparkline(values: Sequence[float | None], lo: float | None = None, hi: float | None = None) -> str:
    """One glyph per value, scaled between `lo` and `hi` (default: the values' min and max).

    None (no data) is a space; a flat series is drawn at the lowest glyph.
    """
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    lo = min(known) if lo is None else lo
    hi = max(known) if hi is None else hi
    span = hi - lo
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif span <= 0:
            out.append(SPARK[0])
        else:
            frac = min(1.0, max(0.0, (v - lo) / span))
            out.append(SPARK[min(len(SPARK) - 1, int(frac * len(SPARK)))])
    return "".join(out)


def series(rows: Iterable[HistoryRow], key: str, source: str, width: int) -> list[float | None]:
    """`key` over time in `width` equal time buckets, the mean of matching rows in each.

    `source` is "learner", "actor" (every actor) or "actor:<id>". Empty buckets are None.
    """
    points = []
    for row in rows:
        if row.source == source or (source == "actor" and row.actor is not None):
            v = _num(row.snapshot.get(key))
            if v is not None:
                points.append((row.t, v))
    if not points or width < 1:
        return [None] * max(width, 0)
    t0, t1 = points[0][0], points[-1][0]
    sums, counts = [0.0] * width, [0] * width
    for t, v in points:
        i = width - 1 if t1 <= t0 else min(width - 1, int((t - t0) / (t1 - t0) * width))
        sums[i] += v
        counts[i] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _age(t: Any, now: float) -> str:
    t = _num(t)
    return "-" if t is None else _duration(now - t)


def _duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def _header(state: TelemetryState, now: float) -> Panel:
    ln = state.learner
    title = f"dvi monitor · namespace {state.namespace} · {time.strftime('%H:%M:%S', time.localtime(now))}"
    if not ln:
        body: Any = Text("learner: no telemetry yet", style="dim")
    else:
        rows = [
            [
                ("step", _fmt(ln.get("step"))),
                ("phase", _fmt(ln.get("phase"))),
                ("version", _fmt(ln.get("version"))),
                ("updated", _age(ln.get("t"), now) + " ago"),
            ],
            [
                ("backlog", _fmt(ln.get("stream_length"))),
                ("pending", _fmt(ln.get("pending"))),
                ("traj/s", _fmt(ln.get("trajectories_per_s"), 1)),
                ("dead-lettered", _fmt(ln.get("dead_lettered"))),
                ("dropped", _fmt(ln.get("dropped"))),
                ("stale", _fmt(ln.get("stale_dropped"))),
                ("rollbacks", _fmt(ln.get("rollbacks_seen"))),
            ],
            [
                ("kl", _fmt(ln.get("kl"), 4)),
                ("ce", _fmt(ln.get("ce"), 3)),
                ("pg", _fmt(ln.get("pg"), 3)),
                ("entropy", _fmt(ln.get("entropy"), 3)),
                ("grad", _fmt(ln.get("grad_norm"), 3)),
            ],
        ]
        alarming = {"dead-lettered": ln.get("dead_lettered"), "dropped": ln.get("dropped"),
                    "rollbacks": ln.get("rollbacks_seen")}
        lines = []
        for row in rows:
            line = Text()
            for i, (k, v) in enumerate(row):
                # a no-break space keeps each "key value" together when a narrow terminal wraps
                line.append(("   " if i else "") + k + "\u00a0", style="dim")
                line.append(v, style="bold red" if _num(alarming.get(k)) else "bold")
            lines.append(line)
        body = Group(*lines)
        if (_num(ln.get("t")) or now) < now - STALE_S:
            body = Group(body, Text(f"learner silent for {_age(ln.get('t'), now)}", style="bold yellow"))
    actors = len(state.actors)
    fallback = sum(1 for a in state.actors.values() if _num(a.get("ar_fallback")))
    subtitle = f"{actors} actor{'s' if actors != 1 else ''}" + (f" · {fallback} in AR fallback" if fallback else "")
    return Panel(body, title=title, title_align="left", subtitle=subtitle, subtitle_align="right")


_TRENDS = (
    ("tau", "tau", "actor", 2),
    ("acceptance", "acceptance", "actor", 3),
    ("tok/s per actor", "tokens_per_s", "actor", 1),
    ("kl", "kl", "learner", 4),
    ("stream backlog", "stream_length", "learner", 0),
)


def _trends(state: TelemetryState, width: int) -> Table | Text:
    if not state.history:
        return Text("history: empty", style="dim")
    table = Table(title="history", title_justify="left", box=None, padding=(0, 1), show_edge=False)
    for name, justify in (("", "left"), ("trend", "left"), ("last", "right"), ("min", "right"), ("max", "right")):
        table.add_column(name, justify=justify, style="dim" if name in ("min", "max") else None)
    span = state.history[-1].t - state.history[0].t
    for label, key, source, digits in _TRENDS:
        values = series(state.history, key, source, width)
        known = [v for v in values if v is not None]
        if not known:
            continue
        style = "cyan" if source == "actor" else "magenta"
        table.add_row(
            label,
            Text(sparkline(values), style=style),
            _fmt(known[-1], digits),
            _fmt(min(known), digits),
            _fmt(max(known), digits),
        )
    if table.row_count == 0:
        return Text(f"history: {len(state.history)} snapshots without tau, acceptance or kl", style="dim")
    table.caption = f"last {len(state.history)} snapshots over {_duration(span)}"
    table.caption_justify = "left"
    return table


_ACTOR_COLUMNS = (
    ("actor", "left"), ("version", "right"), ("lag", "right"), ("tok/s", "right"), ("tau", "right"),
    ("tau trend", "left"), ("accept", "right"), ("by pos", "left"), ("gamma", "right"), ("mode", "left"),
    ("requests", "right"), ("rollbacks", "right"), ("seen", "right"),
)


_COMPACT_DROPS = ("tau trend", "by pos", "requests", "seen")  # left out below _WIDE columns
_WIDE = 118


class _Sized:
    """Builds its renderable when the console width is known: `build(max_width)`."""

    def __init__(self, build: Callable[[int], Any]) -> None:
        self.build = build

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        yield self.build(options.max_width)


def _redis_health(snap: dict[str, Any]) -> Text:
    """Shown after an actor's name, from its last snapshot: nothing while all is well; " redis x2"
    after outages it rode out; " redis down (5 held)" while its outbox holds trajectories; and
    " 3 lost" in red when its outbox overflowed."""
    text = Text()
    outages = int(_num(snap.get("redis_outages")) or 0)
    if snap.get("redis_ok") is not None and not _num(snap.get("redis_ok")):
        text.append(f" redis down ({int(_num(snap.get('outbox')) or 0)} held)", style="bold red")
    elif outages:
        text.append(f" redis x{outages}", style="yellow")
    lost = int(_num(snap.get("trajectories_lost")) or 0)
    if lost:
        text.append(f" {lost} lost", style="bold red")
    return text


def _actors(state: TelemetryState, now: float, spark_width: int, compact: bool = False) -> Table | Text:
    if not state.actors:
        return Text(f"actors: none publishing in namespace {state.namespace!r}", style="dim")
    columns = [(n, j) for n, j in _ACTOR_COLUMNS if not (compact and n in _COMPACT_DROPS)]
    table = Table(title="actors", title_justify="left", header_style="bold", padding=(0, 1))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for actor_id, snap in state.actors.items():
        stale = (_num(snap.get("t")) or now) < now - STALE_S
        ar = bool(_num(snap.get("ar_fallback")))
        lag = _num(snap.get("version_lag"))
        rollbacks = _num(snap.get("rollbacks"))
        by_pos = [_num(v) for v in snap.get("acceptance_by_position") or []]
        cells = {
            "actor": Text(actor_id).append(_redis_health(snap)),
            "version": _fmt(snap.get("version")),
            "lag": Text(_fmt(snap.get("version_lag")), style="yellow" if lag and lag > 1 else ""),
            "tok/s": _fmt(snap.get("tokens_per_s"), 1),
            "tau": _fmt(snap.get("tau")),
            "tau trend": Text(sparkline(series(state.history, "tau", f"actor:{actor_id}", spark_width)), style="cyan"),
            "accept": _fmt(snap.get("acceptance"), 3),
            "by pos": Text(sparkline(by_pos, 0.0, 1.0), style="cyan"),
            "gamma": _fmt(snap.get("gamma")),
            "mode": Text("AR", style="bold yellow") if ar else Text("spec", style="green"),
            "requests": _fmt(snap.get("requests")),
            "rollbacks": Text(_fmt(snap.get("rollbacks")), style="bold red" if rollbacks else ""),
            "seen": _age(snap.get("t"), now),
        }
        table.add_row(*[cells[name] for name, _ in columns], style="dim" if stale else None)
    return table


def _events(state: TelemetryState, limit: int) -> Table:
    """The latest `limit` events other than weight broadcasts (newest first), and the last broadcast."""
    table = Table(title="recent events", title_justify="left", box=None, padding=(0, 2), show_header=False)
    table.add_column("time", style="dim", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("details", overflow="fold")
    broadcasts = [e for e in state.events if e.kind == "weights_published"]
    notable = [e for e in state.events if e.kind != "weights_published"]
    if broadcasts:
        last = broadcasts[-1]
        table.caption = (
            f"last broadcast {time.strftime('%H:%M:%S', time.localtime(last.t))}: "
            + "  ".join(f"{k}={_fmt(v, 3)}" for k, v in last.fields.items())
            + f"  ({len(broadcasts)} in the last {len(state.events)} events)"
        )
        table.caption_justify = "left"
    for ev in reversed(notable[-limit:]):  # newest first
        style = EVENT_STYLES.get(ev.kind, "")
        details = "  ".join(f"{k}={_fmt(v, 3)}" for k, v in ev.fields.items())
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(ev.t)),
            Text(ev.kind, style=style),
            Text(details, style=style if ev.kind == "rollback" else ""),
        )
    if not notable:
        table.add_row("", Text("no rollbacks, fallbacks or dead letters", style="dim"), "")
    return table


def render(state: TelemetryState, now: float | None = None, spark_width: int | None = None, events: int = 8) -> Group:
    """One frame of the monitor for `state`, as of wall time `now` (default: `state.read_at`).

    `spark_width` glyphs per history sparkline (default: fits the console); below 118 columns
    the actor table leaves out its trend, per-position, requests and age columns.
    """
    now = state.read_at if now is None else now

    def width(max_width: int) -> int:
        return spark_width if spark_width is not None else max(12, min(64, max_width - 54))

    return Group(
        _header(state, now),
        _Sized(lambda w: _trends(state, width(w))),
        Text(""),
        _Sized(lambda w: _actors(state, now, max(8, min(12, width(w) // 4)), compact=w < _WIDE)),
        _events(state, events),
    )


def demo_state(seed: int = 0, now: float = 1_760_000_000.0, minutes: float = 30.0, actors: int = 3) -> TelemetryState:
    """A synthetic but plausible 30-minute run (for `dvi monitor --demo`, docs and tests).

    The drafter improves from tau ~1.6 to ~3 over weight versions 1..12; version 9 is a bad
    update that actor a1 rolls back; a2 starts in AR fallback and is released by a probe.
    """
    run = _DemoRun(seed, actors)
    t = now - minutes * 60
    if actors > 2:
        run.add_event(t + 15, "ar_fallback", actor="a2", tau_ema=1.41, break_even=2.5)
    while t < now:
        t += run.rng.uniform(10.0, 14.0)
        run.learner_tick(t)
        for actor_id in run.state:
            run.actor_tick(actor_id, t)
    run.history.sort(key=lambda r: r.t)
    run.events.sort(key=lambda e: e.t)
    return TelemetryState(
        actors=dict(sorted(run.actor_snaps.items())),
        learner={**run.learner, "t": run.history[-1].t if run.history else now},
        events=run.events,
        history=run.history[-500:],
        namespace="demo",
        read_at=now,
    )


class _DemoRun:
    """The state `demo_state` advances: one learner tick every 10-14 s, then each actor's request."""

    def __init__(self, seed: int, actors: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.history: list[HistoryRow] = []
        self.events: list = []
        self.seq = 0
        self.learner: dict[str, Any] = {}
        self.actor_snaps: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict[str, Any]] = {
            f"a{i}": {"version": 0, "requests": 0, "tokens": 0, "rollbacks": 0, "ar": i == 2} for i in range(actors)}
        self.step = self.version = 0

    def entry_id(self, t: float) -> str:
        self.seq += 1
        return f"{int(t * 1000)}-{self.seq}"

    @staticmethod
    def quality(version: int) -> float:
        """Acceptance of the drafter at this version (version 9 is the bad update)."""
        return 0.35 + 0.42 * (1 - math.exp(-version / 4)) - (0.25 if version == 9 else 0.0)

    def add_event(self, t: float, kind: str, **fields: Any) -> None:
        from common.transport.redis.telemetry import Event

        self.events.append(Event(self.entry_id(t), kind, t, fields))

    def learner_tick(self, t: float) -> None:
        rng = self.rng
        self.step += 8
        step = self.step
        if step % 80 == 0:
            self.version += 1
            self.add_event(t, "weights_published", version=self.version, step=step)
        kl = 1.4 * math.exp(-step / 500) + 0.08 + rng.gauss(0, 0.01)
        self.learner = {
            "step": step, "phase": "kl" if step < 600 else "mixed", "kl": kl, "ce": 2.2 * kl + 0.9,
            "pg": -0.02 * (step >= 600), "entropy": 1.1 + kl / 3, "grad_norm": 0.4 + rng.random() * 0.3,
            "version": self.version, "stream_length": rng.randint(4, 40), "pending": rng.randint(0, 8),
            "dead_lettered": 1 if step > 1000 else 0, "dropped": 0, "stale_dropped": step // 400,
            "trajectories_per_s": 3.0 + rng.random(),
        }
        self.history.append(HistoryRow(self.entry_id(t), t, "learner", dict(self.learner)))
        if step == 1000:
            self.add_event(t, "dead_letter", entry="1759998791000-0", reason="trajectory fails validation: hidden rows")

    def actor_tick(self, actor_id: str, t: float) -> None:
        rng, st, version = self.rng, self.state[actor_id], self.version
        if rng.random() < 0.3:
            return
        t_a = t + rng.uniform(0, 1.0)
        if st["version"] < version and version - st["version"] >= 1 and rng.random() < 0.7:
            if not (version == 9 and st["rollbacks"]):
                st["version"] = version
        acc = min(0.95, max(0.05, self.quality(st["version"]) + rng.gauss(0, 0.03)))
        st["on_9"] = st.get("on_9", 0) + (st["version"] == 9)
        if st["on_9"] == 3 and not st["rollbacks"]:  # its DriftGuard judges v9 after a few requests
            self.add_event(t_a, "rollback", actor=actor_id, bad_version=9, good_version=8, before=self.quality(8), after=acc)
            st["version"], st["rollbacks"] = 8, 1
        if st["ar"] and st["version"] >= 3:
            st["ar"] = False
            self.add_event(t_a, "ar_release", actor=actor_id, tau_probe=1 + 5 * acc, break_even=2.5)
        gamma = 0 if st["ar"] else 5
        tau = 1 + sum(acc ** (i + 1) for i in range(gamma))
        st["requests"] += 1
        st["tokens"] += 128
        snap = {
            "tokens_per_s": (22.0 if gamma == 0 else 22.0 * tau / 2.5) + rng.gauss(0, 1),
            "tau": tau, "acceptance": acc if gamma else 0.0,
            "acceptance_by_position": [min(1.0, acc * (1.05 - 0.04 * i)) for i in range(5)] if gamma else [],
            "gamma": gamma, "version": st["version"], "version_lag": version - st["version"],
            "requests": st["requests"], "tokens": st["tokens"], "ar_fallback": int(st["ar"]),
            "rollbacks": st["rollbacks"],
        }
        self.actor_snaps[actor_id] = {**snap, "t": t_a}
        self.history.append(HistoryRow(self.entry_id(t_a), t_a, f"actor:{actor_id}", snap))
