"""Which exit layer pays: `dvi bench speed --learn` once per exit layer, one table.

    python benchmarks/exit_layer_sweep.py --prompts dvi/data/spec_bench/question_dev.jsonl \
        --layers 2,4,6,8,12 --per-category 8 --max-new-tokens 64 --out benchmarks/results/exit_layers

For every layer k it runs `dvi bench speed --exit-layer k --learn SCHEDULE --methods hf_ar,dvi`
(a fresh drafter learns online on the first half of each category's prompts, then it is timed,
frozen, on the other half next to HF `generate` and the untrained drafter) into OUT/layer_k, and
collects one row per layer: the exit head's acceptance in the learning traffic, the learned
drafter's tau, tokens/s and speedup over hf_ar (measured side by side inside that layer's run),
and the untrained drafter's speedup. Writes OUT/exit_layers.{json,md} and prints the table.
Extra arguments after `--` go to every `dvi bench speed` call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def layer_row(layer: int, report: dict, schedule: str) -> dict:
    """One table row from a `dvi bench speed --learn` report (its speed.json, parsed)."""
    overall = {r["method"]: r for r in report["runs"] if r["category"] == "overall"}
    # the frozen starting drafter: `dvi` (reports before dvi_context existed named it dvi_untrained)
    learned, untrained = overall[f"dvi_{schedule}"], overall.get("dvi_untrained") or overall["dvi"]
    learning = report["settings"]["learning"]["schedules"][schedule]
    drafted, accepted = learning["drafted"], learning["accepted"]
    return {
        "exit_layer": layer,
        "learning_drafted": drafted,
        "learning_acceptance": accepted / drafted if drafted else None,
        "tau": learned.get("tau", learned.get("mean_accepted")),  # mean_accepted: reports before the rename
        "tokens_per_s": learned["tokens_per_s"],
        "speedup_vs_hf_ar": learned["speedup_vs_hf_ar"],
        "untrained_speedup_vs_hf_ar": untrained["speedup_vs_hf_ar"],
        "identical_to_ar": min(learned["identical_to_ar"], untrained["identical_to_ar"]),
    }


def markdown(rows: list[dict], schedule: str) -> str:
    def f(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"| exit layer | exit-head acceptance while learning | tau ({schedule}) | tokens/s ({schedule}) "
        "| speedup vs hf_ar | untrained speedup | identical |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['exit_layer']} | {f(r['learning_acceptance'])} | {f(r['tau'])} | {f(r['tokens_per_s'], 1)} "
            f"| {f(r['speedup_vs_hf_ar'], 2)} | {f(r['untrained_speedup_vs_hf_ar'], 2)} | {f(r['identical_to_ar'], 2)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", default="2,4,6,8,12", help="comma-separated exit layers")
    parser.add_argument("--schedule", default="kl-only", help="learning schedule (kl-only, kl-rl, rl-only)")
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    out = Path(args.out)
    rows = []
    for layer in layers:
        run_dir = out / f"layer_{layer}"
        command = [
            sys.executable, "-m", "dvi.cli", "bench", "speed", "--prompts", args.prompts, "--out", str(run_dir),
            "--exit-layer", str(layer), "--learn", args.schedule, "--methods", "hf_ar,dvi",
            "--per-category", str(args.per_category), "--max-new-tokens", str(args.max_new_tokens),
            "--threads", str(args.threads), *extra,
        ]
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        rows.append(layer_row(layer, json.loads((run_dir / "speed.json").read_text()), args.schedule))
        print(markdown(rows[-1:], args.schedule).splitlines()[-1], flush=True)
    table = markdown(rows, args.schedule)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit_layers.json").write_text(json.dumps({"settings": vars(args) | {"extra": extra}, "rows": rows}, indent=1))
    (out / "exit_layers.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
