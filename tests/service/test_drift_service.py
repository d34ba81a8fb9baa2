"""The drift guard and the AR fall-back wired into a generation actor, on stories260K and a real Redis.

A plain in-process `Generator` (no Ray) with a real `WeightStore`, `TrajectoryStream` and
`Telemetry` under a fresh namespace. The drafter is stories260K cut at layer 3, whose untrained
exit head accepts ~0.4 of its drafts at gamma 4; a "corrupt" update replaces every LoRA tensor
with noise x 50, which accepts nothing. Every answer is checked token for token against Hugging
Face greedy decoding of the frozen model: the guards change speed, never output.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from actors.generator import Generator, GeneratorConfig
from common.observe.drift import ArFallbackConfig, DriftGuardConfig
from common.observe.metrics import MetricsRecorder
from common.transport.redis.telemetry import RunMetricsWriter, Telemetry
from common.transport.redis.streams import TrajectoryStream, TransportConfig
from common.transport.redis.weights import WeightStore
from dvi.cli import main
from dvi.monitor import render
from tests.helpers import head_only, run_watcher, stories_with_references
from tests.tiny_models import stories_split

pytestmark = pytest.mark.slow

EXIT_LAYER = 3
# The untrained exit head copied from the last layer (4) accepts ~0.47 of its drafts on these
# openings, which makes it the "good" version here; copied from layer k (the default) it accepts
# ~0.24, too close to a broken version's 0 for a 64-token drift window.
EXIT_INIT_LAYER = 4
DECODE = head_only(gamma=4, max_new_tokens=32)  # the exit head drafts every block: its acceptance is what drifts
OPENINGS = ["Once upon a time", "The little dog", "Tom and Sue", "One day, a bird", "Lily wanted to",
            "There was a big", "The cat was sad because", "In the park"]
# Judge a version after 64 drafted tokens (about two requests at acceptance 0.4), not 256.
GUARD = DriftGuardConfig(window=64, min_baseline_tokens=64)


@pytest.fixture
def stories():
    split, prompts, references, untrained = stories_with_references(
        EXIT_LAYER, tuple(OPENINGS), DECODE.max_new_tokens, exit_init_layer=EXIT_INIT_LAYER)
    split.load_adapter_state(untrained, 0)  # each test starts from the untrained drafter at version 0
    return split, prompts, references, untrained


def corrupt(tensors: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A blown-up update: every LoRA tensor replaced by noise x 50 (the drafter accepts nothing)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 50 for k, v in tensors.items()}


def serve(gen: Generator, prompts, references, n: int, tag: str) -> list[dict]:
    """Serve `n` requests (cycling the prompts); every answer must equal plain greedy."""
    out = []
    for i in range(n):
        j = i % len(prompts)
        result = gen.serve(f"{tag}-{i}", prompt_ids=prompts[j], decode=DECODE)
        assert result["token_ids"] == references[j], (tag, i, result["version"])
        out.append(result)
    return out


def metric(recorder: MetricsRecorder, name: str, **labels) -> float | None:
    for entry in recorder.snapshot().get(name, []):
        if entry["labels"] == {k: str(v) for k, v in labels.items()}:
            return entry["value"]
    return None


def test_bad_version_is_rolled_back_and_the_learner_monitor_and_report_hear_of_it(
    stories, redis_client, redis_ns, tmp_path
):
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.service import LearnerLoop, LearnerLoopConfig

    split, prompts, references, untrained = stories
    transport = TransportConfig(namespace=redis_ns)
    store = WeightStore(redis_client, redis_ns)
    telemetry = Telemetry(redis_client, redis_ns)
    metrics = MetricsRecorder(backend="memory")
    gen = Generator(split, GeneratorConfig(actor_id="actor-0", learn=True, drift_guard=GUARD),
                    stream=TrajectoryStream(redis_client, transport), weights=store, metrics=metrics,
                    telemetry=telemetry)
    assert gen.fallback is None  # a learning actor keeps drafting by default
    assert metric(metrics, "dvi_actor_rollbacks", actor="actor-0") == 0.0  # exists before any rollback

    store.publish(untrained, 1, "learner-0")  # the good version
    good = serve(gen, prompts, references, 4, "good")
    assert {r["version"] for r in good} == {1} and sum(r["drafted"] for r in good) >= GUARD.window
    assert sum(r["accepted"] for r in good) / sum(r["drafted"] for r in good) > 0.3

    store.publish(corrupt(untrained), 2, "learner-0")  # a broken broadcast
    bad = serve(gen, prompts, references, 1, "bad")[0]
    assert bad["version"] == 2 and bad["accepted"] == 0 and bad["drafted"] >= GUARD.window
    # judged on that one request: rolled back to version 1, and version 2 is never taken again
    assert gen.version == 1 and gen.blocked_versions == [2]
    after = serve(gen, prompts, references, 3, "after")
    assert {r["version"] for r in after} == {1} and gen.sync_weights() == 1
    # The verdict is stored in Redis: a restarted actor (fresh process, version 0) never takes
    # version 2, and resumes from the newest good one.
    split.load_adapter_state(untrained, 0)
    restarted = Generator(split, GeneratorConfig(actor_id="actor-0", learn=False, drift_guard=GUARD), weights=store)
    assert restarted.sync_weights() == 1 and restarted.blocked_versions == [2]
    assert store.blocked_versions() == {2}
    # An idle actor's weight watcher neither takes version 2 again nor spins on it.
    calls = []
    latest_version = store.latest_version
    store.latest_version = lambda: calls.append(1) or latest_version()
    run_watcher(gen, 1.0)
    del store.latest_version
    assert gen.version == 1 and len(calls) <= 8, len(calls)  # ~2 per poll; a busy loop makes thousands
    status = gen.status()
    assert status["counters"]["rollbacks"] == 1 and status["versions_seen"] == [0, 1, 2, 1]
    (decision,) = status["rollbacks"]
    assert (decision["bad_version"], decision["good_version"], decision["after"]) == (2, 1, 0.0)
    assert decision["before"] > 0.3
    assert metric(metrics, "dvi_actor_rollbacks", actor="actor-0") == 1.0
    assert metric(metrics, "dvi_drift_rollbacks", version=2) == 1.0
    assert metric(metrics, "dvi_drift_acceptance_ema", actor="actor-0", version=1) > 0.3
    assert metric(metrics, "dvi_actor_weight_version", actor="actor-0") == 1.0

    # The rollback is an event in Redis ...
    state = telemetry.read()
    rollbacks = [e for e in state.events if e.kind == "rollback"]
    assert len(rollbacks) == 1
    assert rollbacks[0].fields["actor"] == "actor-0"
    assert (rollbacks[0].fields["bad_version"], rollbacks[0].fields["good_version"]) == (2, 1)
    assert state.actors["actor-0"]["rollbacks"] == 1 and state.actors["actor-0"]["blocked_versions"] == [2]

    # ... which is how the learner hears of it, in its ordinary poll
    learner = Learner(stories_split(EXIT_LAYER, exit_init_layer=EXIT_INIT_LAYER), LearnerConfig())
    learner_metrics = MetricsRecorder(backend="memory")
    loop = LearnerLoop(learner, TrajectoryStream(redis_client, transport), store,
                       LearnerLoopConfig(block_ms=0, publish_every_steps=1000, publish_every_s=1e6),
                       telemetry=telemetry, metrics=learner_metrics)
    for name in ("dvi_learner_skipped_steps", "dvi_learner_trajectories_dropped",
                 "dvi_learner_trajectories_stale", "dvi_learner_trajectories_dead_lettered"):
        assert metric(learner_metrics, name) == 0.0, name  # rare events: series exist at 0
    loop.poll(block_ms=0)
    assert loop.status()["rollbacks_seen"] == 1 and loop.status()["rollbacks"][0]["bad_version"] == 2
    loop.poll(block_ms=0)
    assert loop.status()["rollbacks_seen"] == 1  # counted once
    # (this learner warm-started from the store's latest, the corrupted version 2: its updates are
    # not finite and are skipped, which the counter shows)
    assert metric(learner_metrics, "dvi_learner_skipped_steps") == learner.counters()["skipped_steps"]

    # ... the monitor shows it ...
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(render(telemetry.read()))
    frame = console.export_text().replace("\u00a0", " ")
    assert "rollback" in frame and "bad_version=2" in frame and "good_version=1" in frame
    row = next(line for line in frame.splitlines() if "actor-0" in line and "│" in line)
    assert row.split("│")[12].strip() == "1"  # the rollbacks column

    # ... and so does `dvi report` on the run's metrics
    run_dir = tmp_path / "run"
    RunMetricsWriter(run_dir).write(telemetry.read())
    assert main(["report", str(run_dir)]) == 0
    report = (run_dir / "report" / "report.md").read_text()
    assert "| drift-guard rollbacks | 1 |" in report
    assert any(line.startswith("| ") and "| rollback |" in line and "bad_version=2" in line
               for line in report.splitlines())
    assert (run_dir / "report" / "versions.png").is_file()

    # A good new version (the good tensors again, as version 3) is judged and kept.
    store.publish(untrained, 3, "learner-0")
    later = serve(gen, prompts, references, 4, "v3")
    assert {r["version"] for r in later} == {3} and sum(r["drafted"] for r in later) >= GUARD.window
    assert gen.guard.good_version() == 3 and gen.blocked_versions == [2] and gen.counters["rollbacks"] == 1
    assert [e.kind for e in telemetry.read().events].count("rollback") == 1
    assert json.loads(json.dumps(gen.status()))  # JSON-able for the Ray shell


def test_ar_fallback_on_a_useless_drafter_and_release_on_good_weights(stories, redis_client, redis_ns):
    split, prompts, references, untrained = stories
    store = WeightStore(redis_client, redis_ns)
    telemetry = Telemetry(redis_client, redis_ns)
    metrics = MetricsRecorder(backend="memory")
    # Break-even 1.5 tokens per pass: the untrained head (tau ~2.4) pays, the corrupt one (1.0) does not.
    fallback = ArFallbackConfig(break_even_tau=1.5, window=8, probe_every=4, release_probes=2)
    gen = Generator(split, GeneratorConfig(actor_id="actor-1", learn=False, drift_guard=None, ar_fallback=True,
                                           ar_fallback_config=fallback),
                    weights=store, metrics=metrics, telemetry=telemetry)

    store.publish(corrupt(untrained, seed=1), 1, "learner-0")  # guard off: nothing rolls it back
    first = serve(gen, prompts, references, 2, "useless")
    assert first[0]["drafted"] > 0 and first[0]["acceptance"] < 0.05
    assert gen.ar_active  # 8 drafting blocks below break-even: drafting is off
    assert [e.kind for e in telemetry.read().events] == ["ar_fallback"]
    assert gen.snapshot()["ar_fallback"] == 1 and gen.snapshot()["gamma"] == 0
    assert metric(metrics, "dvi_actor_ar_fallback", actor="actor-1") == 1.0
    assert metric(metrics, "dvi_actor_gamma", actor="actor-1") == 0.0

    ar = serve(gen, prompts, references, 3, "ar")
    for r in ar:  # one verifier pass per token, drafting only in the probe every 4th block
        assert r["verifier_passes"] == r["new_tokens"]
        assert 0 < r["drafted"] <= DECODE.gamma * (r["verifier_passes"] // fallback.probe_every + 1)
        assert r["drafted"] < r["verifier_passes"]
    assert gen.ar_active

    store.publish(untrained, 2, "learner-0")  # good weights: the next probes pay off
    released = serve(gen, prompts, references, 3, "good")
    assert {r["version"] for r in released} == {2}
    assert not gen.ar_active
    kinds = [e.kind for e in telemetry.read().events]
    assert kinds == ["ar_fallback", "ar_release"]
    release = telemetry.read().events[-1].fields
    assert release["actor"] == "actor-1" and release["tau_probe"] > 1.5 and release["version"] == 2
    assert released[-1]["drafted"] > released[-1]["verifier_passes"]  # drafting every block again
    assert released[-1]["tau"] > 1.5
    assert metric(metrics, "dvi_actor_ar_fallback", actor="actor-1") == 0.0
    assert gen.counters["ar_fallbacks"] == 1 and gen.counters["ar_releases"] == 1
