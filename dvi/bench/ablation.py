"""Each speed lever of dvi switched off in turn, timed side by side (`dvi bench ablation`).

The full method ("dvi") decodes with every lever on: the fast engine, the trained exit head, its
reduced draft vocabulary, context drafting, traffic drafting (what earlier requests' n-grams were
followed by, learned as the variant serves), the confidence stop, adaptive gamma, the draft-source
arbitration and the shallow pass a context draft shares with its block's input. Each other
variant ("dvi-<lever>") switches exactly one lever off and keeps the rest, so its row shows what
that lever is worth on this machine; "ar" and "hf_ar" anchor the table. All variants run
interleaved on the same prompts through `dvi.bench.speed.run_benchmark` and are checked
token for token against hf_ar.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common.core.config import DecodeConfig, DrafterConfig

FULL = "dvi"
LEVERS: dict[str, str] = {
    "engine": "the HF decoder layers instead of the fast engine (packed weights, static KV cache)",
    "learning": "the untrained exit head instead of the one trained online",
    "draft_vocab": "the full vocabulary in the drafter's LM head instead of the reduced one",
    "context": "no context drafting: every block asks the exit head",
    "exit_head": "no exit-head drafts: context drafting only (gamma 0)",
    "confidence": "no confidence stop: the exit head drafts gamma tokens every block",
    "adaptive_gamma": "fixed draft lengths (gamma, every context match in full) instead of the per-block choice from acceptance and cost",
    "arbitration": "any context match wins the block instead of the choice by expected tokens per cost",
    "shared_pass": "the block's input and a context draft in separate shallow passes, a probe of the exit head priced as a draft step",
    "traffic": "no traffic drafting: the request's own context only, never what followed its suffix in earlier requests",
}
"""Lever name -> what its variant does instead (the table's `off` column)."""


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: how its drafter is built and how it decodes."""

    name: str
    lever: str | None
    engine: str
    trained: bool
    draft_vocab_size: int
    decode: DecodeConfig


def variants(decode: DecodeConfig, draft_vocab_size: int, levers: tuple[str, ...] = tuple(LEVERS)) -> list[Variant]:
    """The full method, then one variant per lever in `levers` with that lever off (pure)."""
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown}: choose from {', '.join(LEVERS)}")
    full = Variant(FULL, None, "fast", True, draft_vocab_size, decode)
    off = {
        "engine": replace(full, engine="hf"),
        "learning": replace(full, trained=False),
        "draft_vocab": replace(full, draft_vocab_size=0),
        "context": replace(full, decode=replace(decode, context_tokens=0)),
        "exit_head": replace(full, decode=replace(decode, gamma=0)),
        "confidence": replace(full, decode=replace(decode, confidence_threshold=0.0)),
        "adaptive_gamma": replace(full, decode=replace(decode, adaptive_gamma=False)),
        "arbitration": replace(full, decode=replace(decode, arbitrate=False)),
        "shared_pass": replace(full, decode=replace(decode, shared_shallow_pass=False)),
        "traffic": replace(full, decode=replace(decode, traffic_drafting=False)),
    }
    return [full] + [replace(off[lever], name=f"{FULL}-{lever}", lever=lever) for lever in levers]


def drafter_config_of(meta: dict) -> DrafterConfig:
    """The DrafterConfig an adapter was trained with (its dvi_adapter.json `drafter` block)."""
    fields = meta.get("drafter")
    if not isinstance(fields, dict):
        raise ValueError("the adapter's dvi_adapter.json has no drafter block")
    known = set(DrafterConfig.__dataclass_fields__)
    return DrafterConfig(**{k: v for k, v in fields.items() if k in known})


def markdown_table(rows: list[dict], full: str = FULL) -> str:
    """The overall rows of `dvi.bench.speed.aggregate` as the ablation table (speedups vs hf_ar
    and vs the full method, measured in the same run)."""
    overall = {r["method"]: r for r in rows if r["category"] == "overall"}
    base = overall.get(full, {}).get("tokens_per_s")
    head = "| variant | switched off | tokens/s | speedup vs hf_ar | vs dvi (all on) | tau | identical |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for method, row in overall.items():
        lever = method.split("-", 1)[1] if method.startswith(f"{full}-") else None
        off = LEVERS.get(lever, "nothing (every lever on)" if method == full else "reference" if method == "hf_ar" else "all drafting")
        relative = row["tokens_per_s"] / base if base and row["tokens_per_s"] else None
        cells = [method, off, _fmt(row["tokens_per_s"], 1), _fmt(row["speedup_vs_hf_ar"]), _fmt(relative),
                 _fmt(row["tau"]), _fmt(row["identical_to_ar"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_reports(out: Path, payload: dict, table: str) -> None:
    """ablation.json (payload) and ablation.md (the table and how it was made)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(payload, indent=2) + "\n")
    settings = payload["settings"]
    (out / "ablation.md").write_text("\n".join([
        f"# dvi bench ablation: {payload['model']}",
        "",
        f"Machine: {payload['machine']['processor']}, {payload['machine']['threads']} torch threads. "
        f"{settings['prompts_used']} prompts, max_new_tokens {settings['max_new_tokens']}, greedy, batch 1, "
        "variants interleaved per prompt in rotating order.",
        "",
        table,
        "",
        f"Command: `{settings.get('command', '')}`",
        "",
    ]))
