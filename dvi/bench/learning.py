"""The learning benchmark (`dvi bench learning`) and the reports `dvi train-local` shares with it.

Protocol: every schedule starts from the same untrained exit head, trains with `learner.local.train_local`
on the training half of the prompts, and is evaluated (greedy, pooled tau and acceptance, see
`learner.local`) on the same held-out half every `eval_every` steps. The untrained evaluation is
measured once and shared by every schedule (it is the same drafter on the same prompts).

Halves (`split_train_eval`): within each category, in file order, the first ceil(n/2) prompts train
and the rest evaluate; each half is then interleaved across categories (round-robin in order of
first appearance), so that any prefix of either half (`--train-limit`, `--eval-limit`) covers the
categories evenly. A Spec-Bench file is sorted by category, so a plain first/second half would
train and evaluate on disjoint tasks.

Reports: learning.json (settings + points per schedule), learning.md (summary table) and
learning.png (tau and acceptance against drafted tokens seen, one line per schedule).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence, TypeVar

from common.core.prompts import skipped_summary, spec_bench_task

P = TypeVar("P")


# --------------------------------------------------------------------------- prompts
def interleave_categories(prompts: Sequence[P]) -> list[P]:
    """Round-robin over categories (order of first appearance), keeping file order within each."""
    by_category: dict[str, list[P]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    out: list[P] = []
    depth = max((len(v) for v in by_category.values()), default=0)
    for i in range(depth):
        for items in by_category.values():
            if i < len(items):
                out.append(items[i])
    return out


def split_train_eval(prompts: Sequence[P]) -> tuple[list[P], list[P]]:
    """(train, eval): per category the first ceil(n/2) train and the rest evaluate; each interleaved.

    A single prompt cannot be split: ValueError.
    """
    if len(prompts) < 2:
        raise ValueError(f"need at least 2 prompts to split into training and held-out halves, got {len(prompts)}")
    train: list[P] = []
    held_out: list[P] = []
    by_category: dict[str, list[P]] = {}
    for p in prompts:
        by_category.setdefault(p.category, []).append(p)
    for items in by_category.values():
        cut = (len(items) + 1) // 2
        train.extend(items[:cut])
        held_out.extend(items[cut:])
    if not held_out:  # every category had one prompt: split the interleaved list instead
        mixed = interleave_categories(prompts)
        cut = (len(mixed) + 1) // 2
        return mixed[:cut], mixed[cut:]
    return interleave_categories(train), interleave_categories(held_out)


# --------------------------------------------------------------------------- summary
def tokens_to_fraction(points: Sequence[dict], fraction: float = 0.9, key: str = "tokens_seen") -> int | None:
    """`key` at the first point whose tau reaches tau_before + fraction * (tau_after - tau_before).

    None when tau did not improve (tau_after <= tau_before) or there are fewer than two points.
    """
    if len(points) < 2:
        return None
    before, after = points[0]["tau"], points[-1]["tau"]
    if not after > before:
        return None
    goal = before + fraction * (after - before)
    for p in points:
        if p["tau"] >= goal - 1e-12:
            return int(p[key])
    return int(points[-1][key])


def summarize(name: str, points: Sequence[dict]) -> dict:
    """One table row: tau and acceptance (and agreement, when the points carry it) before (first
    point) and after (last point) training."""
    first, last = points[0], points[-1]
    agreement = ({"agreement_before": first["agreement"], "agreement_after": last["agreement"]}
                 if "agreement" in first and "agreement" in last else {})
    return {
        "schedule": name,
        "steps": last["step"] - first["step"],
        "tau_before": first["tau"],
        "tau_after": last["tau"],
        "acceptance_before": first["acceptance"],
        "acceptance_after": last["acceptance"],
        **agreement,
        "tokens_seen": last["tokens_seen"],
        "traffic_tokens": last["traffic_tokens"],
        "tokens_seen_to_90pct": tokens_to_fraction(points, 0.9, "tokens_seen"),
        "traffic_tokens_to_90pct": tokens_to_fraction(points, 0.9, "traffic_tokens"),
    }


def markdown_table(rows: Sequence[dict]) -> str:
    """The summary rows as markdown; the agreement columns appear when every row has them."""
    agreement = bool(rows) and all("agreement_after" in r for r in rows)
    head = (
        "| schedule | steps | tau before | tau after | acceptance before | acceptance after "
        + ("| agreement before | agreement after " if agreement else "")
        + "| drafted tokens seen | traffic tokens | traffic to 90% of the tau gain |\n"
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if agreement else "") + "---:|---:|---:|\n"
    )

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3f}"

    body = "".join(
        f"| {r['schedule']} | {r['steps']} | {fmt(r['tau_before'])} | {fmt(r['tau_after'])} "
        f"| {fmt(r['acceptance_before'])} | {fmt(r['acceptance_after'])} "
        + (f"| {fmt(r['agreement_before'])} | {fmt(r['agreement_after'])} " if agreement else "")
        + f"| {fmt(r['tokens_seen'])} "
        f"| {fmt(r['traffic_tokens'])} | {fmt(r['traffic_tokens_to_90pct'])} |\n"
        for r in rows
    )
    return head + body


# --------------------------------------------------------------------------- files
def plot_learning(runs: dict[str, Sequence[dict]], path: str | Path, title: str) -> Path:
    """learning.png: tau, acceptance and (when the points carry it) agreement against drafted tokens
    seen, a panel each, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["tau", "acceptance"] + (["agreement"] if any(p.get("agreement") is not None
                                                         for points in runs.values() for p in points) else [])
    labels = {"tau": "tau (tokens per verifier pass)", "acceptance": "acceptance (accepted / drafted)",
              "agreement": "held-out top-1 agreement (every position)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for name, points in runs.items():
        x = [p["tokens_seen"] for p in points]
        for ax, key in zip(axes, keys):
            ax.plot(x, [p.get(key) for p in points], marker="o", ms=3, label=name)
    for ax, label in zip(axes, (labels[k] for k in keys)):
        ax.set_xlabel("drafted tokens seen by the learner")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as JSON (NaN/inf become null) via a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=1) + "\n")
    tmp.replace(path)
    return path


def write_table_report(out: str | Path, stem: str, payload: dict, lines: Sequence[str]) -> str:
    """`<out>/<stem>.json` (`payload`, via `write_json`) and `<out>/<stem>.md` (`lines`, one per
    line); returns the markdown."""
    markdown = "\n".join(lines) + "\n"
    write_json(Path(out) / f"{stem}.json", payload)
    (Path(out) / f"{stem}.md").write_text(markdown)
    return markdown


def write_bench_reports(out: str | Path, settings: dict, runs: dict[str, list[dict]], skipped: dict | None = None) -> str:
    """learning.json, learning.md and learning.png of a benchmark; returns the markdown.
    `skipped`: {"skipped_requests": n, "skipped": [...]}, the prompts that could not be served."""
    out = Path(out)
    rows = [summarize(name, points) for name, points in runs.items()]
    write_json(out / "learning.json", {
        "settings": settings,
        **(skipped or skipped_summary([])),
        "schedules": {name: {"points": points} for name, points in runs.items()},
        "summary": rows,
    })
    title = (f"{settings.get('model')} exit layer {settings.get('exit_layer')}, gamma {settings.get('gamma')}, "
             f"{settings.get('eval_prompts')} held-out prompts")
    plot_learning(runs, out / "learning.png", title)
    train_gamma = settings.get("train_gamma") or settings.get("gamma")
    lines = [
        "# DVI learning benchmark",
        "",
        f"Model `{settings.get('model')}`, exit layer {settings.get('exit_layer')}; held-out evaluation: greedy, "
        f"gamma {settings.get('gamma')}, max {settings.get('max_new_tokens')} new tokens, "
        f"{settings.get('eval_prompts')} prompts, pooled. Training: {settings.get('train_prompts')} prompts "
        f"(gamma {train_gamma}), {settings.get('steps')} optimiser steps per schedule, "
        f"{settings.get('updates_per_request')} per training request, batch {settings.get('batch_tokens')} drafted tokens, "
        f"lr head {settings.get('head_lr')} / exit layer {settings.get('lora_lr')}, "
        f"staleness policy {settings.get('staleness_policy')}.",
        "",
        markdown_table(rows),
        "tau = new tokens / verifier passes; acceptance = accepted / drafted tokens; agreement = the exit head's",
        "top-1 agreement with the verifier at every held-out position, ungated. \"traffic to 90%\" is the number",
        "of tokens the training requests generated before held-out tau first reached tau before + 90% of the",
        "(tau after - tau before) gain. Every schedule starts from the same untrained exit head.",
        "",
        "Command: `" + str(settings.get("command", "")) + "`",
        "",
    ]
    markdown = "\n".join(lines)
    (out / "learning.md").write_text(markdown)
    return markdown


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def select_per_task(questions: list, per_category: int | None, limit: int | None) -> list:
    """The first `per_category` prompts of each Spec-Bench task (all when None), then the first `limit`."""
    seen: dict[str, int] = {}
    kept = []
    for q in questions:
        task = spec_bench_task(q.category)
        seen[task] = seen.get(task, 0) + 1
        if per_category is None or seen[task] <= per_category:
            kept.append(q)
    return kept[:limit] if limit is not None else kept
