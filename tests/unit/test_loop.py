"""`learner.loop.LearnerLoop` in-process over the in-memory transport (no Redis, no Ray), with a
counting fake learner so every expected number can be worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.transport.memory import MemoryTrajectoryStream, MemoryWeightStore
from learner.loop import LearnerLoop, LearnerLoopConfig, step_credit
from tests.helpers import make_trajectory


class FakeSplit:
    model_id, exit_layer, weight_version = "fake", 2, 0

    def __init__(self, learner: "FakeLearner") -> None:
        self.learner = learner

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"w": torch.tensor([float(self.learner.step)])}  # the "weights" are the step count

    def load_adapter_state(self, tensors, version) -> None:
        self.learner.step = int(tensors["w"].item())


class FakeLearner:
    """Dedupes request ids, refuses exit layers other than 2, is ready from `batch_tokens` scored
    tokens, and logs publish_version / save_checkpoint calls in order."""

    def __init__(self, batch_tokens: int = 8) -> None:
        self.config = SimpleNamespace(batch_tokens=batch_tokens)
        self.split = FakeSplit(self)
        self.step = self.version = 0
        self.seen: set[str] = set()
        self.log: list[tuple[str, int]] = []
        self._c = {"added": 0, "duplicates": 0, "stale_dropped": 0, "tokens_seen": 0, "skipped_steps": 0, "steps": 0}

    def add(self, trajs) -> int:
        if any(t.exit_layer != 2 for t in trajs):
            raise ValueError("trained at exit layer 2")
        for t in trajs:
            if t.request_id in self.seen:
                self._c["duplicates"] += 1
                continue
            self.seen.add(t.request_id)
            self._c["added"] += 1
            self._c["tokens_seen"] += t.num_scored
        return len(trajs)

    def ready(self) -> bool:
        return self._c["tokens_seen"] >= self.config.batch_tokens

    def train_step(self) -> dict:
        self.step += 1
        return {"step": float(self.step), "skipped": 0.0, "kl": 0.5, "phase": "kl"}

    def publish_version(self) -> int:
        self.version += 1
        self.log.append(("publish_version", self.version))
        return self.version

    def save_checkpoint(self, directory) -> None:
        self.log.append(("checkpoint", self.step))

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    def seen_count(self) -> int:
        return len(self.seen)


class LoggingStore(MemoryWeightStore):
    def __init__(self, log: list) -> None:
        super().__init__(keep=100)
        self.log = log

    def publish(self, tensors, version, learner_id, metadata=None):
        self.log.append(("store", version))
        return super().publish(tensors, version, learner_id, metadata)


def traj(i: int, exit_layer: int = 2):
    return make_trajectory(n_drafted=8, seed=i, request_id=f"r{i}", exit_layer=exit_layer)  # 8 scored tokens


def test_step_credit_is_per_request_plus_per_token():
    cfg = LearnerLoopConfig(steps_per_request=2.0, replay_ratio=0.5)
    assert step_credit(3, 128, 64, cfg) == 2.0 * 3 + 0.5 * 128 / 64  # = 7
    assert step_credit(0, 0, 64, cfg) == 0.0
    with pytest.raises(ValueError, match="both 0"):
        LearnerLoopConfig(steps_per_request=0.0, replay_ratio=0.0)


def test_publish_cadence_and_checkpoint_before_every_publish(tmp_path):
    learner = FakeLearner(batch_tokens=8)
    stream, store = MemoryTrajectoryStream(), LoggingStore(learner.log)
    cfg = LearnerLoopConfig(checkpoint_dir=str(tmp_path / "ckpt"), replay_ratio=0.0, steps_per_request=3.0,
                            publish_every_steps=2, publish_every_s=1e9, checkpoint_every_steps=1000,
                            checkpoint_every_s=1e9, claim_every_s=1e9, block_ms=0)
    loop = LearnerLoop(learner, stream, store, cfg)
    for i in range(2):  # 2 requests x 3 steps = 6 steps -> versions 1, 2, 3 at steps 2, 4, 6
        stream.publish(traj(i))
        assert loop.poll() == 1
    assert learner.step == 6 and [e["version"] for e in store.publish_log()] == [1, 2, 3]
    assert [store.fetch(v).tensors["w"].item() for v in (1, 2, 3)] == [2.0, 4.0, 6.0]
    # every publish: bump the version, checkpoint, and only then hand the weights to the store
    assert learner.log == [("publish_version", 1), ("checkpoint", 2), ("store", 1),
                           ("publish_version", 2), ("checkpoint", 4), ("store", 2),
                           ("publish_version", 3), ("checkpoint", 6), ("store", 3)]
    assert stream.pending_count() == 0 and loop.counters["acked"] == 2


def test_entries_are_acked_only_after_a_checkpoint_holds_them(tmp_path):
    now = [0.0]
    learner = FakeLearner(batch_tokens=1000)  # never ready: no steps, no publishes
    stream = MemoryTrajectoryStream(clock=lambda: now[0])
    cfg = LearnerLoopConfig(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_s=10.0, claim_every_s=1e9,
                            block_ms=0)
    loop = LearnerLoop(learner, stream, MemoryWeightStore(), cfg, clock=lambda: now[0])
    for i in range(3):
        stream.publish(traj(i))
    assert loop.poll() == 3 and stream.pending_count() == 3  # applied, not durable yet
    now[0] = 9.9
    loop.poll()
    assert stream.pending_count() == 3 and learner.log == []
    now[0] = 10.0  # checkpoint_every_s passed with unacked entries: checkpoint, then ack
    loop.poll()
    assert learner.log == [("checkpoint", 0)] and stream.pending_count() == 0 and loop.counters["acked"] == 3


def test_duplicates_earn_no_credit_and_refused_records_are_dead_lettered():
    learner = FakeLearner(batch_tokens=8)
    stream, store = MemoryTrajectoryStream(), MemoryWeightStore()
    cfg = LearnerLoopConfig(replay_ratio=0.0, steps_per_request=1.0, publish_every_steps=100, block_ms=0)
    loop = LearnerLoop(learner, stream, store, cfg)
    for t in (traj(0), traj(0), traj(1, exit_layer=3), traj(2)):  # r0 twice; r1 from another exit layer
        stream.publish(t)
    assert loop.poll() == 4
    assert learner.counters()["added"] == 2 and learner.counters()["duplicates"] == 1
    assert learner.step == 2  # one step per added request: the duplicate and the refused one pay nothing
    assert [(e, reason.split(":")[0]) for e, _, reason in stream.dead_letters] == [("3", "learner refused")]
    assert loop.counters["refused"] == 1 and stream.pending_count() == 0


def test_stop_at_step_and_claiming_a_dead_consumers_entries():
    learner = FakeLearner(batch_tokens=8)
    stream = MemoryTrajectoryStream(clock=lambda: 100.0)
    cfg = LearnerLoopConfig(replay_ratio=0.0, steps_per_request=4.0, stop_at_step=5, claim_min_idle_ms=0,
                            publish_every_steps=100, block_ms=0)
    for i in range(3):
        stream.publish(traj(i))
    assert len(stream.consume("crashed", count=2)) == 2  # delivered to a consumer that died
    loop = LearnerLoop(learner, stream, MemoryWeightStore(), cfg, clock=lambda: 100.0)
    info = loop.start()
    assert info["claimed"] == 2 and loop.counters["claimed"] == 2
    assert learner.step == 5  # 2 requests x 4 = 8 steps of credit, stopped at 5
    assert loop.poll() == 1 and learner.step == 5 and learner.counters()["added"] == 3
    loop.finish()  # spends no credit past stop_at_step; publishes the 5 steps taken
    assert learner.step == 5 and learner.version == 1
