"""`dvi run` (the service on a workload; also the `ray job submit` entrypoint) and `dvi demo`.

`dvi demo` is the embedded default: a local Ray, an embedded Redis (the local server if one
answers, else a private one started for the run), SmolLM2-135M-Instruct from its wheel and the
Spec-Bench dev prompts, with a live table of tau per weight version as the drafter learns.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from common.core.config import DEFAULT_MODEL, DecodeConfig, DrafterConfig

from dvi import options
from dvi.data import SPEC_BENCH_DEV
from dvi.driver import RunConfig
from dvi.app import app

DEFAULT_WORKLOAD = SPEC_BENCH_DEV
def _workload(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(
            f"workload not found: {path} (pass --workload FILE.jsonl, Spec-Bench format: question_id, category, turns)"
        )
    return path


def _learner_config(head_lr: float | None, lora_lr: float | None, batch_tokens: int | None, max_staleness: int | None):
    from dataclasses import replace

    from learner.config import LearnerConfig

    changes: dict[str, Any] = {}
    if head_lr is not None:
        changes["head_lr"] = head_lr
    if lora_lr is not None:
        changes["lora_lr"] = lora_lr
    if head_lr is not None or lora_lr is not None:
        changes["fine_tune_lr"] = None  # rates given on the command line apply from any start
    if batch_tokens is not None:
        changes["batch_tokens"] = batch_tokens
        changes["replay_capacity_tokens"] = max(LearnerConfig.replay_capacity_tokens, batch_tokens)
    if max_staleness is not None:
        changes["max_staleness"] = max_staleness
    return replace(LearnerConfig(), **changes)


@dataclass(frozen=True)
class DemoLearning:
    """What `dvi demo` changes from the service's learner defaults, so that a run of a few minutes
    on 2 CPU cores publishes several weight versions (the learning rates stay LearnerConfig's)."""

    batch_tokens: int = 16
    """Scored positions per learner step (the service's default waits for more)."""
    replay_ratio: float = 4.0
    """Learner steps per batch of newly added drafted tokens."""
    publish_every_s: float = 15.0
    """Publish at least this often while the learner steps."""


DEMO_LEARNING = DemoLearning()


@app.command()
def run(
    workload: Path = typer.Option(..., "--workload", help="Spec-Bench-format JSONL of prompts (question_id, category, turns)."),
    out: Path = typer.Option(..., "--out", help="Directory for generations.jsonl, summary.json and the learner checkpoint."),
    actors: int = typer.Option(2, "--actors", help="Generation actors (one per GPU on a GPU cluster)."),
    model: options.Model = DEFAULT_MODEL,
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="DVI_REDIS_URL", help="Redis for streams and weights (default: the local one, else an embedded server)."),
    learn: bool = typer.Option(True, "--learn/--no-learn", help="Run the learner (off: serve with fixed weights)."),
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: options.Gamma = DecodeConfig.gamma,
    draft_vocab_size: options.DraftVocabSize = DrafterConfig.draft_vocab_size,
    max_new_tokens: int = typer.Option(DecodeConfig.max_new_tokens, "--max-new-tokens", help="Most new tokens per prompt."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples losslessly."),
    confidence_threshold: options.ConfidenceThreshold = DecodeConfig.confidence_threshold,
    context_tokens: options.ContextTokens = DecodeConfig.context_tokens,
    adaptive_gamma: options.AdaptiveGamma = DecodeConfig.adaptive_gamma,
    traffic_drafting: options.TrafficDrafting = DecodeConfig.traffic_drafting,
    publish_every: options.PublishEvery = RunConfig.publish_every,
    publish_every_s: options.PublishEverySeconds = RunConfig.publish_every_s,
    replay_ratio: options.ReplayRatio = RunConfig.replay_ratio,
    head_lr: Optional[float] = typer.Option(None, "--head-lr", help="Learner lr of the LM-head LoRA (default: LearnerConfig)."),
    lora_lr: Optional[float] = typer.Option(None, "--lora-lr", help="Learner lr of the exit-layer LoRA (default: LearnerConfig)."),
    batch_tokens: Optional[int] = typer.Option(None, "--batch-tokens", help="Drafted tokens per learner step."),
    max_staleness: Optional[int] = typer.Option(None, "--max-staleness", help="Oldest usable trajectory, in versions."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Serve only the first N prompts."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (host:port, auto, ray://...); default: RAY_ADDRESS or a local Ray."),
    namespace: Optional[str] = typer.Option(None, "--namespace", help="Redis key prefix (default: a fresh dvi:<run id>)."),
    dtype: str = typer.Option("float32", "--dtype", help="Base weights dtype: float32, float16, bfloat16."),
    seed: int = typer.Option(0, "--seed", help="Base sampling seed."),
    weight_secret_file: Optional[Path] = typer.Option(
        None, "--weight-secret-file", help="File holding the weight-signing secret (default: see below)."),
    live: bool = typer.Option(False, "--live/--no-live", help="Show the live table (default: one line per request)."),
    truncate_prompts: options.TruncatePrompts = RunConfig.truncate_prompts,
) -> None:
    """Serve WORKLOAD on N Ray actors while the learner improves the drafter; write OUT/summary.json.

    Weight records are always signed: the secret comes from --weight-secret-file, else
    $DVI_WEIGHT_SECRET / $DVI_WEIGHT_SECRET_FILE, else (local Ray) a fresh one in OUT/weight-secret,
    else (a cluster) each node's ~/.dvi/weight-secret.
    """
    decode = DecodeConfig(gamma=gamma, temperature=temperature, max_new_tokens=max_new_tokens,
                          confidence_threshold=confidence_threshold, context_tokens=context_tokens,
                          adaptive_gamma=adaptive_gamma, traffic_drafting=traffic_drafting)
    config = RunConfig(
        workload=_workload(workload), out=out, actors=actors, model=model, exit_layer=exit_layer,
        draft_vocab_size=draft_vocab_size, dtype=dtype, decode=decode, learn=learn, publish_every=publish_every,
        publish_every_s=publish_every_s, replay_ratio=replay_ratio,
        learner=_learner_config(head_lr, lora_lr, batch_tokens, max_staleness), limit=limit, redis_url=redis_url,
        ray_address=ray_address, namespace=namespace, secret_file=weight_secret_file, seed=seed,
        truncate_prompts=truncate_prompts,
    )
    _execute(config, live=live)


@app.command()
def demo(
    limit: int = typer.Option(24, "--limit", help="Prompts to serve."),
    actors: int = typer.Option(2, "--actors", help="Generation actors."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most new tokens per prompt."),
    workload: Path = typer.Option(DEFAULT_WORKLOAD, "--workload", help="Prompts (default: the Spec-Bench dev split)."),
    model: options.Model = DEFAULT_MODEL,
    exit_layer: options.ExitLayer = DrafterConfig.exit_layer,
    gamma: options.Gamma = DecodeConfig.gamma,
    publish_every: options.PublishEvery = RunConfig.publish_every,
    redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="DVI_REDIS_URL", help="Redis (default: the local one, else an embedded server)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for generations.jsonl and summary.json."),
    live: bool = typer.Option(True, "--live/--no-live", help="Show the live table."),
    truncate_prompts: options.TruncatePrompts = RunConfig.truncate_prompts,
) -> None:
    """The whole service on one machine: local Ray, embedded Redis, SmolLM2, Spec-Bench dev prompts."""


    config = RunConfig(
        workload=_workload(workload),
        out=out,
        actors=actors,
        model=model,
        exit_layer=exit_layer,
        decode=DecodeConfig(gamma=gamma, max_new_tokens=max_new_tokens),
        learn=True,
        publish_every=publish_every,
        publish_every_s=DEMO_LEARNING.publish_every_s,
        replay_ratio=DEMO_LEARNING.replay_ratio,
        learner=_learner_config(None, None, DEMO_LEARNING.batch_tokens, None),
        limit=limit,
        redis_url=redis_url,
        truncate_prompts=truncate_prompts,
    )
    _execute(config, live=live)


# ---------------------------------------------------------------------------------- output


def _terminate(signum, frame) -> None:
    # SIGTERM (e.g. `ray job stop`, a container stop): unwind like Ctrl-C so Ray and any embedded
    # Redis this run started are shut down instead of being left behind.
    raise KeyboardInterrupt


def _execute(config, live: bool) -> None:
    import signal
    import threading

    from rich.console import Console

    from dvi.driver import run_service

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    console = Console(stderr=False)
    if live and console.is_terminal:
        summary = _run_live(config, console)
    else:
        started = time.time()
        summary = run_service(config, on_result=_print_line(console),
                              on_phase=lambda s: console.print(f"[dim]{time.time() - started:6.1f} s  {s.phase}...[/dim]"))
    _print_summary(console, summary, config.out)


def _print_line(console):
    def show(state, result: dict[str, Any]) -> None:
        done = len(state.results)
        if "error" in result:
            console.print(f"[{done}/{state.total}] {result['request_id']} on {result.get('actor')}: [red]{result['error']}[/red]")
            return
        if "skipped" in result:
            console.print(f"[{done}/{state.total}] {result['request_id']}: [yellow]skipped: {result['skipped']}[/yellow]")
            return
        console.print(
            f"[{done}/{state.total}] {result['actor']} v{result['version']}: tau {result['tau']:.2f}, "
            f"acceptance {result['acceptance']:.2f}, {result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tok/s"
        )

    return show


def _table(state, learner: dict[str, Any] | None = None):
    from rich.table import Table

    elapsed = time.time() - state.started
    done = len(state.results)
    title = f"dvi service: {done}/{state.total} requests, {elapsed:.0f} s — {state.phase}"
    grid = Table.grid(padding=(0, 2))
    versions = Table(title="tau by weight version", title_justify="left")
    versions.add_column("version", justify="right")
    versions.add_column("reqs", justify="right")
    versions.add_column("tau", justify="right")
    versions.add_column("", justify="left", min_width=25, no_wrap=True)
    by_version = state.tau_by_version()
    top = max([t for t, _ in by_version.values()] + [1.0])
    shown = list(by_version.items())
    if len(shown) > 10:  # the first version and the nine newest
        versions.add_row(str(shown[0][0]), str(shown[0][1][1]), f"{shown[0][1][0]:.3f}", "")
        versions.add_row("…", "", "", "")
        shown = shown[-9:]
    for version, (tau, n) in shown:
        bar = "█" * int(round(24 * (tau - 1.0) / max(top - 1.0, 0.05)))  # tokens beyond AR's 1 per pass
        versions.add_row(str(version), str(n), f"{tau:.3f}", f"[green]{bar}[/green]")
    actors = Table(title="actors", title_justify="left")
    actors.add_column("actor")
    actors.add_column("version", justify="right")
    actors.add_column("requests", justify="right")
    actors.add_column("last tau", justify="right")
    actors.add_column("tok/s", justify="right")
    last: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    from dvi.driver import served

    for r in state.results:
        if served(r):
            last[r["actor"]] = r
            counts[r["actor"]] = counts.get(r["actor"], 0) + 1
    for actor_id in sorted(last):
        r = last[actor_id]
        actors.add_row(actor_id, str(r["version"]), str(counts[actor_id]), f"{r['tau']:.2f}", f"{r['tokens_per_s']:.1f}")
    grid.add_row(versions, actors)
    outer = Table(title=title, title_justify="left", show_header=False, box=None)
    outer.add_row(grid)
    if learner:
        outer.add_row(
            f"learner: step {learner.get('step')}, published v{learner.get('version')}, "
            f"kl {_fmt(learner.get('kl'))}, trajectories {learner.get('added')}, stream pending {learner.get('pending')}"
        )
    return outer


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def _run_live(config, console) -> dict[str, Any]:
    from rich.live import Live

    from common.core.errors import ServiceError
    from dvi.driver import RunState, run_service

    holder: dict[str, Any] = {"telemetry": None, "learner": None, "read_at": 0.0}  # learner line, read from telemetry

    def learner_snapshot(state: RunState) -> dict[str, Any] | None:
        if not config.learn or not state.redis_url or time.time() - holder["read_at"] < 2.0:
            return holder["learner"]
        holder["read_at"] = time.time()
        try:
            if holder["telemetry"] is None:
                from common.transport.redis.client import connect
                from common.transport.redis.telemetry import Telemetry

                holder["telemetry"] = Telemetry(connect(state.redis_url, retries=1), state.namespace)
            holder["learner"] = holder["telemetry"].read(history=0, events=0).learner or None
        except (ServiceError, ValueError, KeyError):
            pass
        return holder["learner"]

    with Live(console=console, refresh_per_second=2, transient=False) as view:
        started = time.time()

        def on_phase(state: RunState) -> None:
            view.console.print(f"[dim]{time.time() - started:6.1f} s  {state.phase}...[/dim]")
            view.update(_table(state, holder["learner"]))

        def on_result(state: RunState, result: dict[str, Any]) -> None:
            view.update(_table(state, learner_snapshot(state)))

        return run_service(config, on_result=on_result, on_phase=on_phase)


def tau_quarters(points: list[dict[str, Any]]) -> list[float]:
    """Mean tau of each quarter of the requests, in completion order (fewer parts for < 4 requests)."""
    parts = min(4, len(points))
    if parts == 0:
        return []
    size = len(points) / parts
    return [
        sum(p["tau"] for p in chunk) / len(chunk)
        for chunk in (points[round(i * size): round((i + 1) * size)] for i in range(parts))
        if chunk
    ]


def _print_summary(console, summary: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(title="run summary", title_justify="left", show_header=False)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key in ("requests", "skipped_requests", "failed_requests", "tokens", "tokens_per_s", "tau", "trajectories_produced",
                "trajectories_consumed", "dead_lettered", "weight_versions_published", "wall_seconds"):
        value = summary.get(key)
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    quarters = tau_quarters(summary["tau_over_time"])
    if quarters:
        table.add_row("tau, run in quarters", " → ".join(f"{t:.2f}" for t in quarters))
    table.add_row("versions seen", "; ".join(
        f"{a}: {len(v)} (v{v[0]}..v{v[-1]})" if v else f"{a}: none" for a, v in summary["versions_seen_per_actor"].items()
    ))
    console.print(table)
    console.print(f"wrote {out / 'generations.jsonl'} and {out / 'summary.json'}")
    if summary.get("skipped_requests"):
        print(f"warning: {summary['skipped_requests']} request(s) skipped (reasons in summary.json)", file=sys.stderr)
    if summary.get("failed_requests"):
        print(f"warning: {summary['failed_requests']} request(s) failed; see generations.jsonl", file=sys.stderr)
