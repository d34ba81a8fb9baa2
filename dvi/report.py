"""`dvi report RUN_DIR`: plots and a markdown summary of a run's metrics history.

Reads `RUN_DIR/metrics.jsonl` (one object per telemetry history row: `t`, `source` = "learner"
or "actor:<id>", and the snapshot keys documented in common/transport/redis/telemetry.py), `RUN_DIR/events.jsonl`
and `RUN_DIR/summary.json` when present, and writes `RUN_DIR/report/{tau,acceptance,kl,
versions,throughput}.png` (those with data) and `RUN_DIR/report/report.md`. Matplotlib is used
through `Figure` objects only (Agg canvas, no pyplot state), so it runs headless.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.transport.redis.telemetry import EVENTS_FILE, METRICS_FILE

REPORT_DIR = "report"
_HINT = "record one with `dvi monitor --run-dir RUN_DIR` while the service runs (common.transport.redis.telemetry.RunMetricsWriter)"


@dataclass
class RunMetrics:
    """A run's metrics history, split by source and sorted by time."""

    learner: list[dict[str, Any]] = field(default_factory=list)
    actors: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    """Lines of metrics.jsonl that were not JSON objects with `t` and `source` (e.g. cut by a crash)."""

    @property
    def t0(self) -> float:
        ts = [r["t"] for r in self.learner[:1]] + [rows[0]["t"] for rows in self.actors.values() if rows]
        return min(ts) if ts else 0.0

    @property
    def t1(self) -> float:
        ts = [r["t"] for r in self.learner[-1:]] + [rows[-1]["t"] for rows in self.actors.values() if rows]
        return max(ts) if ts else 0.0


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, skipped = [], 0
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if isinstance(obj, dict) and isinstance(obj.get("t"), (int, float)):
                rows.append(obj)
            else:
                skipped += 1
    return rows, skipped


def load_run(run_dir: str | Path) -> RunMetrics:
    """Read a run directory; ValueError naming the file when it has no metrics."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"no metrics in {run_dir}: {path.name} is missing; {_HINT}")
    rows, skipped = _read_jsonl(path)
    run = RunMetrics(skipped=skipped)
    for row in sorted(rows, key=lambda r: r["t"]):
        source = str(row.get("source", ""))
        if source == "learner":
            run.learner.append(row)
        elif source.startswith("actor:"):
            run.actors.setdefault(source[len("actor:") :], []).append(row)
        else:
            run.skipped += 1
    if not run.learner and not run.actors:
        raise ValueError(f"no metrics in {run_dir}: {path.name} holds no learner or actor rows; {_HINT}")
    run.actors = dict(sorted(run.actors.items()))
    if (run_dir / EVENTS_FILE).is_file():
        run.events = sorted(_read_jsonl(run_dir / EVENTS_FILE)[0], key=lambda e: e["t"])
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{summary_path} is not valid JSON: {err}") from err
        run.summary = summary if isinstance(summary, dict) else {"summary": summary}
    return run


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _xy(rows: list[dict[str, Any]], key: str, t0: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None:
            xs.append((r["t"] - t0) / 60.0)
            ys.append(v)
    return xs, ys


def _rolling_mean(xs: list[float], ys: list[float], bins: int = 60) -> tuple[list[float], list[float]]:
    """Mean of ys in `bins` equal x intervals (empty bins left out)."""
    if not xs:
        return [], []
    lo, hi = min(xs), max(xs)
    if hi <= lo:
        return [lo], [sum(ys) / len(ys)]
    sums, counts = defaultdict(float), defaultdict(int)
    for x, y in zip(xs, ys):
        i = min(bins - 1, int((x - lo) / (hi - lo) * bins))
        sums[i] += y
        counts[i] += 1
    keys = sorted(counts)
    return [lo + (i + 0.5) * (hi - lo) / bins for i in keys], [sums[i] / counts[i] for i in keys]


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("minutes since the first row")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _mark_events(ax, run: RunMetrics) -> None:
    labelled = set()
    for ev in run.events:
        # event lines in red / grey so they never share a colour with the first actors' lines
        style = {"rollback": ("crimson", "-"), "ar_fallback": ("dimgray", "--"), "ar_release": ("dimgray", ":")}.get(ev.get("kind"))
        if style is None:
            continue
        label = ev["kind"] if ev["kind"] not in labelled else None
        labelled.add(ev["kind"])
        ax.axvline((ev["t"] - run.t0) / 60.0, color=style[0], linestyle=style[1], alpha=0.7, label=label)


def _actor_plot(run: RunMetrics, key: str, title: str, ylabel: str, path: Path, total: bool = False) -> bool:
    fig, ax = _figure(title, ylabel)
    all_x, all_y, drawn = [], [], False
    for actor, rows in run.actors.items():
        xs, ys = _xy(rows, key, run.t0)
        if xs:
            ax.plot(xs, ys, linewidth=0.8, alpha=0.5, label=actor if len(run.actors) <= 8 else None)
            all_x += xs
            all_y += ys
            drawn = True
    if not drawn:
        return False
    mx, my = _rolling_mean(all_x, all_y)
    if total:  # per-actor rates add up: the mean per bin times the actor count
        my = [y * len(run.actors) for y in my]
    ax.plot(mx, my, color="black", linewidth=2, label="all actors (sum)" if total else "all actors (mean)")
    _mark_events(ax, run)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return True


def _kl_plot(run: RunMetrics, path: Path) -> bool:
    fig, ax = _figure("Learner losses", "loss")
    drawn = False
    for key in ("kl", "ce"):
        xs, ys = _xy(run.learner, key, run.t0)
        if xs:
            ax.plot(xs, ys, linewidth=1.2, label=key)
            drawn = True
    if not drawn:
        return False
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return True


def _versions_plot(run: RunMetrics, path: Path) -> bool:
    fig, ax = _figure("Weight versions", "version")
    drawn = False
    xs, ys = _xy(run.learner, "version", run.t0)
    if xs:
        ax.step(xs, ys, where="post", color="black", linewidth=2, label="learner published")
        drawn = True
    for actor, rows in run.actors.items():
        xs, ys = _xy(rows, "version", run.t0)
        if xs:
            ax.step(xs, ys, where="post", linewidth=1, alpha=0.7, label=actor if len(run.actors) <= 8 else None)
            drawn = True
    if not drawn:
        return False
    _mark_events(ax, run)
    ax.legend(loc="best", fontsize="small")
    fig.savefig(path)
    return True


def _stats(values: list[float]) -> tuple[float, float, float] | None:
    """(mean of the first 10%, mean of the last 10%, overall mean) of a time-ordered series."""
    if not values:
        return None
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n, sum(values) / len(values)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, separators=(",", ":"))[:120] + "`"
    return str(value).replace("|", "\\|")


def summary_rows(run: RunMetrics) -> list[tuple[str, str]]:
    """(quantity, value) pairs of the report's summary table."""
    actor_rows = [r for rows in run.actors.values() for r in sorted(rows, key=lambda r: r["t"])]
    actor_rows.sort(key=lambda r: r["t"])
    last = run.learner[-1] if run.learner else {}
    rows: list[tuple[str, str]] = [
        ("duration", f"{(run.t1 - run.t0) / 60:.1f} min"),
        ("history rows", f"{len(run.learner)} learner, {sum(len(r) for r in run.actors.values())} actor"),
        ("actors", ", ".join(run.actors) or "none"),
    ]
    for key, label, source in (
        ("tau", "tau", actor_rows),
        ("acceptance", "acceptance", actor_rows),
        ("tokens_per_s", "tokens/s per actor", actor_rows),
        ("kl", "KL", run.learner),
        ("ce", "CE", run.learner),
    ):
        s = _stats([v for v in (_num(r.get(key)) for r in source) if v is not None])
        if s is not None:
            rows.append((f"{label}: first 10% → last 10% (mean)", f"{s[0]:.4g} → {s[1]:.4g} ({s[2]:.4g})"))
    for key, label in (("step", "learner steps"), ("version", "last published version"), ("phase", "schedule phase")):
        if key in last:
            rows.append((label, _fmt(last[key])))
    counts = defaultdict(int)
    for ev in run.events:
        counts[ev.get("kind")] += 1
    rollbacks = counts.get("rollback", 0) or sum(int(_num(rows[-1].get("rollbacks")) or 0) for rows in run.actors.values())
    rows.append(("drift-guard rollbacks", str(rollbacks)))
    flags = [_num(r.get("ar_fallback")) for r in actor_rows if _num(r.get("ar_fallback")) is not None]
    if flags:
        rows.append(("actor snapshots in AR fallback", f"{100 * sum(1 for f in flags if f) / len(flags):.1f}%"))
    for key in ("dead_lettered", "dropped", "stale_dropped"):
        if key in last:
            rows.append((f"trajectories {key.replace('_', ' ')}", _fmt(last[key])))
    if run.skipped:
        rows.append(("malformed metrics lines skipped", str(run.skipped)))
    return rows


@dataclass(frozen=True)
class Report:
    markdown: Path
    plots: tuple[Path, ...]


def build_report(run_dir: str | Path) -> Report:
    """Write RUN_DIR/report/*.png and report.md; ValueError when RUN_DIR has no metrics."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[str, Path]] = []
    for name, title, draw in (
        ("tau", "tau (tokens per verifier pass)", lambda p: _actor_plot(run, "tau", "tau: tokens per verifier pass", "tau", p)),
        ("acceptance", "acceptance rate", lambda p: _actor_plot(run, "acceptance", "Acceptance rate of drafted tokens", "accepted / drafted", p)),
        ("kl", "learner KL and CE", lambda p: _kl_plot(run, p)),
        ("versions", "weight versions", lambda p: _versions_plot(run, p)),
        ("throughput", "tokens per second", lambda p: _actor_plot(run, "tokens_per_s", "Generation throughput", "tokens / s", p, total=True)),
    ):
        path = out / f"{name}.png"
        if draw(path):
            plots.append((title, path))
        elif path.exists():
            path.unlink()  # a stale plot from an earlier report of this directory

    lines = [f"# DVI run report: {run_dir.name}", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(run)]
    if run.summary:
        lines += ["", "## summary.json", "", "| key | value |", "|---|---|"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in run.summary.items()]
    notable = [e for e in run.events if e.get("kind") != "weights_published"]
    if notable:
        lines += ["", "## Events", "", "| minute | kind | details |", "|---|---|---|"]
        for ev in notable[-50:]:
            details = ", ".join(f"{k}={_fmt(v)}" for k, v in ev.items() if k not in ("t", "kind", "id"))
            lines.append(f"| {(ev['t'] - run.t0) / 60:.1f} | {ev.get('kind')} | {details} |")
    lines += ["", "## Plots", ""]
    for title, path in plots:
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return Report(md, tuple(p for _, p in plots))
