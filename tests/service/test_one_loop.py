"""One learning loop: `dvi train-local` and the learner service run the same `learner.loop.LearnerLoop`,
so the same recorded trajectories give the same update, tensor for tensor (issues 13 and 15)."""

from __future__ import annotations

import torch

from common.transport.redis.streams import TrajectoryStream, TransportConfig
from common.transport.redis.weights import WeightStore
from learner.config import LearnerConfig, ScheduleConfig
from learner.learner import Learner
from learner.local import LocalLoopConfig, train_local
from learner.loop import LearnerLoop
from tests.helpers import head_only
from tests.tiny_models import stories_split

OPENINGS = ["Once upon a time", "The little dog", "Tom and Sue", "One day, a bird", "The sun was", "Lily wanted to"]
CONFIG = LearnerConfig(schedule=ScheduleConfig(kind="kl-rl", warmup_steps=4, ramp_steps=4),
                       head_lr=3e-3, lora_lr=3e-3, batch_tokens=16, staleness_policy="drop", max_staleness=2, seed=0)
LOOP = LocalLoopConfig(steps=18, updates_per_request=3, publish_every=2, eval_every=None,
                       decode=head_only(gamma=3, max_new_tokens=12), seed=0)


def fresh_learner() -> Learner:
    torch.manual_seed(0)  # the exit head's LoRA initialisation
    return Learner(stories_split(exit_layer=2), CONFIG, learner_id="same-loop")


def test_train_local_and_the_service_loop_apply_the_same_update(redis_client, redis_ns):
    local = fresh_learner()
    recorded = []
    train_local(local, [local.split.tokenizer(t)["input_ids"] for t in OPENINGS], [[1]], LOOP,
                on_request=lambda r: recorded.append(r.trajectory))
    assert local.step == LOOP.steps and local.version == LOOP.steps // LOOP.publish_every

    # The service's wiring (LearnerService): the loop over the Redis stream and weight store.
    service = fresh_learner()
    transport = TransportConfig(namespace=redis_ns)
    producer = TrajectoryStream(redis_client, transport)
    store = WeightStore(redis_client, redis_ns)
    loop = LearnerLoop(service, TrajectoryStream(redis_client, transport), store,
                       LOOP.loop_config(service.learner_id))
    loop.start()
    for traj in recorded:  # one request per poll, as train-local feeds them
        producer.publish(traj)
        assert loop.poll(block_ms=0) == 1

    assert (service.step, service.version) == (local.step, local.version)
    assert service.counters() == local.counters()
    a, b = local.split.adapter_state(), service.split.adapter_state()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    published = store.fetch(store.latest_version())  # what actors would hot-swap: the same tensors
    assert published.version == service.version
    assert all(torch.equal(published.tensors[n], b[n]) for n in b)
    assert [e["version"] for e in store.publish_log()] == list(range(1, service.version + 1))
    assert producer.pending_count() == 0  # no checkpoint directory: acked on ingest
