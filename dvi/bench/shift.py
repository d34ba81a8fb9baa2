"""Domain shift (`dvi bench shift`): the drafter learns online on one task's traffic, then the traffic
switches task; how fast does acceptance recover on the new task, with no restart?

Protocol: one drafter (the product's default, or --adapter) serves `from_requests` prompts of the
`source` Spec-Bench task, then `to_requests` prompts of the `target` task (each task's prompts in
file order, cycled when more requests are asked than the task has), learning online throughout
with the service's own loop (`dvi.bench.online.learn_online` -> `learner.local.train_local` ->
`learner.loop.LearnerLoop`). Every request is decoded as `dvi bench speed` decodes (greedy, context
drafting and the exit head, arbitration on); its counts are recorded.

Measures, from the recorded requests (pure functions below):
  curve       one point per request: tokens since the switch (negative before it, counted at the
              request's end), exit-head acceptance (accepted / drafted exit-head tokens) and tau
              (tokens / verifier passes), each pooled over the last `window` requests of the same
              phase, so no point mixes the two tasks;
  final       acceptance (and tau) pooled over the last `final_fraction` of the target's requests;
  recovery    tokens since the switch at the first target point whose windowed acceptance reaches
              `recovery_fraction` x final (None when final is 0); the same for tau.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig
from dvi.bench.speed import SpeedSettings

SOURCE, TARGET = "source", "target"


@dataclass(frozen=True)
class ShiftSettings:
    """What one `dvi bench shift` run measures."""

    prompts: str
    """Spec-Bench-format JSONL; the first turn of each question in the two tasks is used."""
    source: str = "translation"
    """The Spec-Bench task served first (`--from`)."""
    target: str = "math_reasoning"
    """The task the traffic switches to (`--to`)."""
    from_requests: int | None = None
    """Requests of the source task before the switch (None = each of its prompts once)."""
    to_requests: int | None = None
    """Requests of the target task after it (None = each of its prompts once)."""
    model: str = DEFAULT_MODEL
    """Alias, local HF directory or hub id of the base model."""
    adapter: str | None = None
    """Starting drafter adapter (None = the drafter `SplitModel` loads by default)."""
    schedule: str = "kl-only"
    """The learner's loss schedule (kl-only, kl-rl, rl-only)."""
    decode: DecodeConfig = DecodeConfig(max_new_tokens=SpeedSettings.max_new_tokens)
    """How every request is decoded (greedy; as `dvi bench speed` decodes its dvi methods)."""
    drafter: DrafterConfig = DrafterConfig()
    """The drafter's shape (exit layer, draft vocabulary)."""
    learn_updates_per_request: int = SpeedSettings.learn_updates_per_request
    """Optimiser steps per request."""
    learn_lr: float | None = SpeedSettings.learn_lr
    """AdamW lr of every trainable tensor."""
    learn_batch_tokens: int = SpeedSettings.learn_batch_tokens
    """Scored positions per optimiser step."""
    learn_publish_every: int = SpeedSettings.learn_publish_every
    """Optimiser steps between weight versions."""
    window: int = 8
    """Requests pooled per curve point (within one phase)."""
    final_fraction: float = 0.25
    """Share of the target's requests, at its end, that defines the final level."""
    recovery_fraction: float = 0.9
    """Recovered = windowed acceptance >= this x the final level."""
    seed: int = 0
    """Seeds the learner."""
    dtype: str = "float32"
    """Torch dtype of the base weights."""
    device: str = "cpu"
    """Torch device."""
    engine: str = "fast"
    """Inference forward: fast or hf."""

    def __post_init__(self) -> None:
        from learner.config import SCHEDULE_KINDS

        if self.source == self.target:
            raise ValueError(f"--from and --to name the same task {self.source!r}: nothing would shift")
        for name in ("from_requests", "to_requests"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.schedule not in SCHEDULE_KINDS:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULE_KINDS)}, got {self.schedule!r}")
        if self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        if not 0.0 < self.final_fraction <= 1.0 or not 0.0 < self.recovery_fraction <= 1.0:
            raise ValueError("final_fraction and recovery_fraction must be in (0, 1]")
        for name in ("learn_updates_per_request", "learn_batch_tokens", "learn_publish_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.decode.greedy or self.decode.record_trajectories:
            raise ValueError("the shift benchmark decodes greedily; the learning loop records trajectories itself")

    def decode_config(self) -> DecodeConfig:
        """How every request is decoded (`learn_online` reads it)."""
        return self.decode


@dataclass(frozen=True)
class RequestRecord:
    """One served request: its phase (source/target), new tokens, verifier passes, exit-head
    drafted/accepted tokens, context-drafted/accepted tokens, and the weight version it ran on."""

    phase: str
    tokens: int
    passes: int
    drafted: int
    accepted: int
    context_drafted: int
    context_accepted: int
    version: int


@dataclass(frozen=True)
class ShiftSummary:
    """Levels and recovery (see the module docstring); None where a level has no drafted token."""

    source_acceptance: float | None
    source_tau: float | None
    final_acceptance: float | None
    final_tau: float | None
    first_target_acceptance: float | None
    tokens_to_recover_acceptance: int | None
    tokens_to_recover_tau: int | None
    target_tokens: int
    extra: dict = field(default_factory=dict)


def _pooled(records: Sequence[RequestRecord]) -> tuple[float | None, float | None]:
    """(acceptance, tau) pooled over `records`."""
    drafted = sum(r.drafted for r in records)
    passes = sum(r.passes for r in records)
    acceptance = sum(r.accepted for r in records) / drafted if drafted else None
    tau = sum(r.tokens for r in records) / passes if passes else None
    return acceptance, tau


def shift_curve(records: Sequence[RequestRecord], window: int) -> list[dict]:
    """One point per request (see the module docstring): phase, tokens_since_switch, acceptance, tau."""
    switch = sum(r.tokens for r in records if r.phase == SOURCE)
    points, done = [], 0
    for i, r in enumerate(records):
        done += r.tokens
        same = [x for x in records[max(0, i - window + 1): i + 1] if x.phase == r.phase]
        acceptance, tau = _pooled(same)
        points.append({"request": i, "phase": r.phase, "tokens_since_switch": done - switch,
                       "acceptance": acceptance, "tau": tau, "version": r.version})
    return points


def tokens_to_recover(curve: Sequence[dict], key: str, final: float | None, fraction: float) -> int | None:
    """tokens_since_switch at the first target point whose `key` reaches fraction x final."""
    if not final:
        return None
    for p in curve:
        if p["phase"] == TARGET and p[key] is not None and p[key] >= fraction * final - 1e-12:
            return int(p["tokens_since_switch"])
    return None


def summarize(records: Sequence[RequestRecord], curve: Sequence[dict], settings: ShiftSettings) -> ShiftSummary:
    """Levels before the switch (the source's last `final_fraction`), right after it, at the end,
    and the tokens to recover."""
    source = [r for r in records if r.phase == SOURCE]
    target = [r for r in records if r.phase == TARGET]

    def tail(rs: Sequence[RequestRecord]) -> Sequence[RequestRecord]:
        return rs[len(rs) - max(1, round(settings.final_fraction * len(rs))):]

    source_acceptance, source_tau = _pooled(tail(source))
    final_acceptance, final_tau = _pooled(tail(target))
    first = next((p for p in curve if p["phase"] == TARGET), None)
    return ShiftSummary(
        source_acceptance=source_acceptance, source_tau=source_tau,
        final_acceptance=final_acceptance, final_tau=final_tau,
        first_target_acceptance=first["acceptance"] if first else None,
        tokens_to_recover_acceptance=tokens_to_recover(curve, "acceptance", final_acceptance, settings.recovery_fraction),
        tokens_to_recover_tau=tokens_to_recover(curve, "tau", final_tau, settings.recovery_fraction),
        target_tokens=sum(r.tokens for r in target),
    )


def plot_shift(curve: Sequence[dict], summary: ShiftSummary, path: Path, title: str, fraction: float) -> None:
    """shift.png: exit-head acceptance (left) and tau (right) against tokens since the switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    for j, (key, label, final) in enumerate((("acceptance", "exit-head acceptance", summary.final_acceptance),
                                             ("tau", "tau (tokens per verifier pass)", summary.final_tau))):
        ax = fig.add_subplot(1, 2, j + 1)
        for phase, colour in ((SOURCE, "tab:blue"), (TARGET, "tab:orange")):
            pts = [p for p in curve if p["phase"] == phase and p[key] is not None]
            ax.plot([p["tokens_since_switch"] for p in pts], [p[key] for p in pts], marker="o", ms=3,
                    color=colour, label=phase)
        ax.axvline(0, color="black", linewidth=0.8, linestyle="--")
        if final:
            ax.axhline(fraction * final, color="grey", linewidth=0.8, linestyle=":", label=f"{fraction:.0%} of final")
        ax.set_xlabel("tokens since the switch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_summary(settings: ShiftSettings, summary: ShiftSummary, machine: str) -> str:
    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.3f}"

    return "\n".join([
        f"# dvi bench shift: {settings.source} -> {settings.target}",
        "",
        f"Model `{settings.model}`, exit layer {settings.drafter.exit_layer}, schedule {settings.schedule}, "
        f"{settings.decode.max_new_tokens} new tokens per request, greedy; machine: {machine}.",
        "",
        "| measure | exit-head acceptance | tau |",
        "|---|---:|---:|",
        f"| {settings.source}, end of its traffic | {fmt(summary.source_acceptance)} | {fmt(summary.source_tau)} |",
        f"| {settings.target}, first window after the switch | {fmt(summary.first_target_acceptance)} | |",
        f"| {settings.target}, final level | {fmt(summary.final_acceptance)} | {fmt(summary.final_tau)} |",
        f"| tokens since the switch to reach {settings.recovery_fraction:.0%} of final | "
        f"{fmt(summary.tokens_to_recover_acceptance)} | {fmt(summary.tokens_to_recover_tau)} |",
        "",
        f"{summary.target_tokens:,} tokens of {settings.target} traffic in all; levels pooled over the last "
        f"{settings.final_fraction:.0%} of each task's requests, curve points over the last {settings.window} requests.",
        "",
    ])


def write_reports(out: Path, settings: ShiftSettings, records: Sequence[RequestRecord], machine: dict,
                  extra: dict | None = None) -> str:
    """shift.json, shift.md and shift.png under `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    curve = shift_curve(records, settings.window)
    summary = summarize(records, curve, settings)
    payload = {"settings": asdict(settings), "machine": machine, **(extra or {}), "summary": asdict(summary),
               "curve": curve, "requests": [asdict(r) for r in records]}
    (out / "shift.json").write_text(json.dumps(payload, indent=1) + "\n")
    where = f"{machine.get('processor')}, {machine.get('cpus_usable')} CPUs, {machine.get('threads')} torch threads"
    markdown = markdown_summary(settings, summary, where)
    (out / "shift.md").write_text(markdown)
    plot_shift(curve, summary, out / "shift.png", f"{settings.model}: {settings.source} -> {settings.target}",
               settings.recovery_fraction)
    return markdown
