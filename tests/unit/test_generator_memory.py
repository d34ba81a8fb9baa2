"""`actors.generator.Generator` and `learner.loop.LearnerLoop` over the in-memory transport
(`common.transport.memory`): publish, hot-swap, rollback and staleness without Redis or Ray.

stories260K cut at layer 3, exit layer copied from layer 4 (its untrained head accepts ~0.4 of
its drafts: the "good" version); a "corrupt" version is noise x 50 (accepts nothing). Every
answer is checked against greedy decoding of the frozen model: swaps change speed, never output.
"""

from __future__ import annotations

import torch

from actors.generator import Generator, GeneratorConfig
from common.observe.drift import DriftGuardConfig
from common.transport.memory import MemoryTrajectoryStream, MemoryWeightStore
from learner.config import LearnerConfig
from learner.learner import Learner
from learner.loop import LearnerLoop, LearnerLoopConfig
from tests.helpers import head_only, stories_with_references

DECODE = head_only(gamma=4, max_new_tokens=32)
OPENINGS = ("Once upon a time", "The little dog", "Tom and Sue", "Lily wanted to")
GUARD = DriftGuardConfig(window=64, min_baseline_tokens=64)


def stories():
    split, prompts, references, untrained = stories_with_references(
        3, OPENINGS, DECODE.max_new_tokens, exit_init_layer=4)
    split.load_adapter_state(untrained, 0)
    return split, prompts, references, untrained


def corrupt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * 50 for k, v in tensors.items()}


def serve(gen, prompts, references, n: int, tag: str) -> list[dict]:
    out = []
    for i in range(n):
        result = gen.serve(f"{tag}-{i}", prompt_ids=prompts[i % len(prompts)], decode=DECODE)
        assert result["token_ids"] == references[i % len(prompts)], (tag, i)
        out.append(result)
    return out


def test_publish_swap_and_rollback_in_memory():
    split, prompts, references, untrained = stories()
    stream, store = MemoryTrajectoryStream(), MemoryWeightStore(keep=2)
    gen = Generator(split, GeneratorConfig(actor_id="a0", learn=True, drift_guard=GUARD), stream=stream, weights=store)

    store.publish(untrained, 1, "learner-0")
    good = serve(gen, prompts, references, 4, "good")
    assert {r["version"] for r in good} == {1}
    entries = stream.consume("learner", count=10)  # every request's trajectory went through the codec
    assert [t.request_id for _, t in entries] == [f"good-{i}" for i in range(4)]
    assert {t.weight_version for _, t in entries} == {1}

    store.publish(corrupt(untrained), 2, "learner-0")
    bad = serve(gen, prompts, references, 1, "bad")[0]
    assert bad["version"] == 2 and bad["accepted"] == 0
    assert gen.version == 1 and gen.blocked_versions == [2] and store.blocked_versions() == {2}
    assert {r["version"] for r in serve(gen, prompts, references, 2, "after")} == {1}

    split.load_adapter_state(untrained, 0)  # a restarted actor never takes the blocked version
    restarted = Generator(split, GeneratorConfig(actor_id="a0", learn=False, drift_guard=GUARD), weights=store)
    assert restarted.sync_weights() == 1 and restarted.blocked_versions == [2]
    assert [e["version"] for e in store.publish_log()] == [1, 2]


def test_a_jump_over_max_version_jump_is_refused():
    split, _, _, untrained = stories()
    store = MemoryWeightStore()
    gen = Generator(split, GeneratorConfig(learn=False, drift_guard=None, max_version_jump=2), weights=store)
    store.publish(untrained, 5, "learner-0")
    assert gen.sync_weights() == 0 and 5 in gen.refused_versions


def test_the_loop_drops_trajectories_older_than_max_staleness():
    """Staleness through the service loop: a trajectory drafted by version v is dropped once
    v < learner version - max_staleness (hand count: versions 0 and 1 against version 3, max 1)."""
    split, prompts, references, untrained = stories()
    stream, store = MemoryTrajectoryStream(), MemoryWeightStore()
    gen = Generator(split, GeneratorConfig(actor_id="a0", learn=True, drift_guard=None), stream=stream)
    for version in (0, 1, 2, 3):
        split.load_adapter_state(untrained, version)
        serve(gen, prompts[:1], references[:1], 1, f"v{version}")
    learner = Learner(split, LearnerConfig(max_staleness=1, batch_tokens=4096), learner_id="l0")
    learner.version = 3
    loop = LearnerLoop(learner, stream, store, LearnerLoopConfig(learner_id="l0", publish_every_steps=1_000))
    loop.start()
    assert loop.poll(block_ms=0) == 4
    counters = learner.counters()
    assert counters["stale_dropped"] == 2 and counters["added"] == 2
    assert stream.pending_count() == 0  # no checkpoint directory: acked on ingest
