"""Unit tests of learner.learner.Learner on tiny random Llamas: which tensors move, the NaN guard,
dedupe and staleness, and checkpoints (bit-identical resume, refusal of foreign or corrupt ones)."""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch

from common.core.errors import AdapterError
from common.model.split import ExitHead, causal_mask
from learner import learner as learner_module
from learner.config import LearnerConfig, ScheduleConfig
from learner.learner import Learner
from tests.helpers import make_trajectory
from tests.tiny_models import tiny_split

H, V = 32, 96  # tiny_split's hidden size and vocabulary


def trajs(n: int, start: int = 0, version: int = 0, n_drafted: int = 12, exit_layer: int = 2):
    """n valid trajectories shaped for tiny_split (H=32, V=96), request ids req-start..req-(start+n-1)."""
    return [
        make_trajectory(n_drafted, hidden=H, vocab=V, k=8, seed=start + i, weight_version=version,
                        exit_layer=exit_layer, gamma=4)
        for i in range(n)
    ]


def config(**kwargs) -> LearnerConfig:
    base = dict(batch_tokens=24, replay_capacity_tokens=512, schedule=ScheduleConfig(warmup_steps=2, ramp_steps=2))
    base.update(kwargs)
    return LearnerConfig(**base)


def snapshot(split) -> dict[str, torch.Tensor]:
    """Every tensor of the frozen base model and of the exit head (LoRA included), cloned."""
    out = {f"model.{n}": p.detach().clone() for n, p in split.model.named_parameters()}
    out.update({f"head.{n}": p.detach().clone() for n, p in split.exit_head.named_parameters()})
    return out


def learner_state(lrn: Learner) -> dict:
    """Everything a failed load must leave untouched."""
    return {
        "adapter": lrn.split.adapter_state(),
        "optim": copy.deepcopy(lrn.optimizer.state_dict()["state"]),
        "step": lrn.step,
        "version": lrn.version,
        "split_version": lrn.split.weight_version,
        "counters": lrn.counters(),
        "replay": [t.request_id for t in lrn.replay.trajectories()],
        "baseline": lrn.baseline.state_dict(),
        "sampler": lrn.sampler.get_state(),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in ("step", "version", "split_version", "counters", "replay", "baseline"):
        assert a[key] == b[key], key
    assert torch.equal(a["sampler"], b["sampler"])
    assert a["adapter"].keys() == b["adapter"].keys()
    for name in a["adapter"]:
        assert torch.equal(a["adapter"][name], b["adapter"][name]), name
    assert a["optim"].keys() == b["optim"].keys()
    for index in a["optim"]:
        for key in a["optim"][index]:
            assert torch.equal(a["optim"][index][key], b["optim"][index][key]), (index, key)


# ----------------------------------------------------------------------------- what moves
def test_only_the_drafters_trainable_tensors_change():
    split = tiny_split(seed=0)
    lrn = Learner(split, config())
    lrn.add(trajs(4))
    before = snapshot(split)
    for _ in range(3):  # step 1 moves lora_B only (lora_B starts at 0, so lora_A's gradient is 0)
        assert lrn.train_step()["skipped"] == 0.0
    after = snapshot(split)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n or ".modules_to_save." in n}
    # every LoRA tensor and the full-rank exit layer's copy moved, nothing else did (base model, the
    # frozen original of the copied layer, norm, lm_head)
    assert changed == lora and any(".modules_to_save." in n for n in lora)
    assert lora == {f"head.{n}" for n in split.named_trainable_parameters()}
    assert not any(p.requires_grad for p in split.model.parameters())


def test_first_step_is_adamw_with_the_group_lr_and_decay():
    # AdamW's first step with clipped gradient g: m_hat = g, sqrt(v_hat) = |g|, so
    #   p1 = p0 * (1 - lr * wd) - lr * g / (|g| + eps)
    # with (lr, wd) of the parameter's group: head (LM-head LoRA) or lora (exit-layer LoRA).
    split = tiny_split(seed=0)
    cfg = config(head_lr=1e-2, head_weight_decay=0.1, lora_lr=1e-3, lora_weight_decay=0.0, grad_clip=1e-3)
    lrn = Learner(split, cfg)
    lrn.add(trajs(4))
    before = {n: p.detach().clone() for n, p in split.named_trainable_parameters().items()}
    grads = {}
    real_step = lrn.optimizer.step

    def spy_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in split.named_trainable_parameters().items()})
        return real_step(*args, **kwargs)

    lrn.optimizer.step = spy_step
    stats = lrn.train_step()
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert stats["grad_norm"] > 1e-3 and torch.isclose(total, torch.tensor(1e-3), rtol=1e-4)  # clipped to grad_clip
    for name, p in split.named_trainable_parameters().items():
        lr, wd = (cfg.head_lr, cfg.head_weight_decay) if "lm_head" in name else (cfg.lora_lr, cfg.lora_weight_decay)
        g = grads[name]
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), expected, rtol=1e-5, atol=1e-9), name
    moved_b = [n for n in before if "lora_B" in n and not torch.equal(before[n], split.named_trainable_parameters()[n])]
    assert len(moved_b) == sum("lora_B" in n for n in before)


def test_not_ready_returns_none_and_stats_are_complete():
    lrn = Learner(tiny_split(seed=0), config(batch_tokens=30))
    assert lrn.train_step() is None and not lrn.ready()
    assert lrn.add(trajs(2, n_drafted=12)) == 2  # 24 < 30 tokens
    assert not lrn.ready() and lrn.train_step() is None
    lrn.add(trajs(1, start=7, n_drafted=12))
    stats = lrn.train_step()
    for key in ("step", "phase", "lambda_kl", "lambda_ce", "lambda_pg", "kl", "ce", "pg", "entropy",
                "reward_mean", "baseline", "grad_norm", "tokens", "step_seconds", "skipped"):
        assert key in stats, key
    assert (stats["step"], stats["phase"], stats["lambda_kl"], stats["lambda_pg"], stats["skipped"]) == (1.0, "kl", 1.0, 0.0, 0.0)
    assert stats["tokens"] == 36.0 and lrn.step == 1  # three 12-token trajectories to reach 30


def test_nan_batch_is_skipped_and_counted():
    split = tiny_split(seed=0)
    lrn = Learner(split, config(batch_tokens=1))
    bad = trajs(1)[0]
    bad.verifier_topk_logprobs[3, 0] = float("nan")  # the KL of row 3 is NaN
    lrn.add([bad])
    before = split.adapter_state()
    stats = lrn.train_step()
    assert stats["skipped"] == 1.0 and stats["step"] == 0.0
    assert lrn.step == 0 and lrn.counters()["skipped_steps"] == 1 and lrn.counters()["steps"] == 0
    assert lrn.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    assert lrn.baseline.value is None
    assert all(p.grad is None for p in split.trainable_parameters())
    after = split.adapter_state()
    assert all(torch.equal(before[n], after[n]) for n in before)


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss whose gradient overflows)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def test_inf_gradient_is_skipped(monkeypatch):
    lrn = Learner(tiny_split(seed=0), config())
    lrn.add(trajs(4))
    real = learner_module.combined_loss

    def exploding(logits, **kwargs):
        loss, stats = real(logits, **kwargs)
        return loss + _InfGrad.apply(logits).sum() * 0.0, stats  # same (finite) loss, inf gradient

    monkeypatch.setattr(learner_module, "combined_loss", exploding)
    stats = lrn.train_step()
    assert stats["skipped"] == 1.0 and stats["loss"] == stats["loss"]  # finite loss, skipped for its gradient
    monkeypatch.setattr(learner_module, "combined_loss", real)
    assert lrn.train_step()["skipped"] == 0.0 and lrn.counters()["skipped_steps"] == 1 and lrn.step == 1


# ----------------------------------------------------------------------------- data in
def test_duplicates_are_counted_and_ignored():
    lrn = Learner(tiny_split(seed=0), config())
    first = trajs(3)
    assert lrn.add(first) == 3
    again = trajs(2, start=2)  # req-2 again, req-3 new
    assert lrn.add(again) == 1
    assert lrn.add([first[0], first[0]]) == 0
    c = lrn.counters()
    assert (c["added"], c["duplicates"], c["tokens_seen"]) == (4, 3, 4 * 12)
    assert [t.request_id for t in lrn.replay.trajectories()] == ["req-0", "req-1", "req-2", "req-3"]


def test_add_rejects_a_foreign_exit_layer_and_adds_nothing():
    lrn = Learner(tiny_split(seed=0), config())
    with pytest.raises(ValueError, match="exit layer 3"):
        lrn.add(trajs(1) + trajs(1, start=5, exit_layer=3))
    assert lrn.counters()["added"] == 0 and len(lrn.replay) == 0


def test_stale_trajectories_are_dropped():
    lrn = Learner(tiny_split(seed=0), config(max_staleness=2))
    lrn.add(trajs(2, start=0, version=0))
    for _ in range(2):
        lrn.publish_version()
    assert lrn.version == 2 and lrn.split.weight_version == 2 and len(lrn.replay) == 2  # 0 >= 2 - 2
    lrn.publish_version()  # version 3: the version-0 trajectories in the replay are now stale
    assert len(lrn.replay) == 0 and lrn.counters()["stale_dropped"] == 2
    assert lrn.add(trajs(1, start=10, version=0) + trajs(1, start=11, version=1)) == 1  # 0 < 3 - 2 <= 1
    c = lrn.counters()
    assert (c["stale_dropped"], c["added"], c["tokens_seen"]) == (3, 3, 36)
    assert [t.request_id for t in lrn.replay.trajectories()] == ["req-11"]


@pytest.mark.parametrize("policy", ["drop", "importance"])
def test_pg_is_weighted_by_the_clipped_ratio_and_importance_keeps_stale(monkeypatch, policy):
    split = tiny_split(seed=0)
    lrn = Learner(split, config(max_staleness=0, staleness_policy=policy, importance_clip=0.5, batch_tokens=24))
    lrn.add(trajs(1, start=0, version=0))
    lrn.publish_version()  # version 1: the version-0 trajectory is now stale (0 < 1 - 0)
    assert len(lrn.replay) == (1 if policy == "importance" else 0)
    assert lrn.add(trajs(1, start=1, version=0) + trajs(1, start=2, version=1)) == (2 if policy == "importance" else 1)
    assert lrn.counters()["stale_dropped"] == (0 if policy == "importance" else 2)
    if policy == "drop":
        lrn.add(trajs(1, start=3, version=1))
    held = lrn.replay.trajectories()
    # every replayed token's PG weight is min(q_now(token) / q_behaviour(token), clip), detached
    expected = {}
    with torch.no_grad():
        for t in held:
            logq = torch.log_softmax(split.drafter_logits(t.hidden, t.position), -1).gather(-1, t.token[:, None]).squeeze(-1)
            expected[t.request_id] = torch.exp(logq - t.drafter_logprob).clamp(max=0.5)
    seen = {}
    real = learner_module.combined_loss

    def spy(logits, **kwargs):
        seen.update(kwargs)
        return real(logits, **kwargs)

    monkeypatch.setattr(learner_module, "combined_loss", spy)
    lrn.train_step()
    # the batch order comes from the seeded sampler; recover it from the drafted tokens
    order, offset = [], 0
    while offset < seen["token"].shape[0]:
        match = [t for t in held if t.request_id not in order and torch.equal(seen["token"][offset: offset + t.num_drafted], t.token)]
        order.append(match[0].request_id)
        offset += match[0].num_drafted
    assert torch.allclose(seen["importance_weight"], torch.cat([expected[r] for r in order]), atol=1e-6)
    weights = torch.cat(list(expected.values()))
    assert (weights == 0.5).any() and (weights < 0.5).any()  # the clip is exercised


# ----------------------------------------------------------------------------- checkpoints
def run_steps(lrn: Learner, n: int, publish_every: int = 3) -> list[dict]:
    out = []
    for _ in range(n):
        stats = lrn.train_step()
        stats.pop("step_seconds")
        out.append(stats)
        if lrn.step % publish_every == 0:
            lrn.publish_version()
    return out


@pytest.mark.parametrize("policy", ["drop", "importance"])
def test_checkpoint_resume_is_bit_identical(tmp_path, policy):
    a, b = 3, 4  # steps before and after the checkpoint; the schedule crosses kl -> ramp -> rl
    # capacity 60 = five 12-token trajectories: the second add evicts; publishing at step 6 (version 2)
    # makes the version-0 ones stale (dropped, or kept with importance weights)
    cfg = config(staleness_policy=policy, max_staleness=1, replay_capacity_tokens=60)
    data = trajs(5) + trajs(3, start=5, version=1)

    straight = Learner(tiny_split(seed=0), cfg)
    straight.add(data[:5])
    stats_a = run_steps(straight, a)
    straight.add(data[5:])
    stats_b = run_steps(straight, b)

    first = Learner(tiny_split(seed=0), cfg)
    first.add(data[:5])
    assert run_steps(first, a) == stats_a
    saved = first.save_checkpoint(tmp_path / "ckpt")
    assert saved == tmp_path / "ckpt" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    resumed = Learner(tiny_split(seed=0), cfg)
    resumed.load_checkpoint(saved)
    assert (resumed.step, resumed.version, resumed.split.weight_version) == (first.step, first.version, first.version)
    resumed.add(data[5:])
    assert run_steps(resumed, b) == stats_b
    assert_same_state(learner_state(resumed), learner_state(straight))
    assert resumed.counters()["stale_dropped"] == (2 if policy == "drop" else 0)  # req-3, req-4 (0-2 evicted)

    probe = Learner(tiny_split(seed=0), cfg)
    probe.load_checkpoint(saved)
    assert probe.add(data[:5]) == 0 and probe.counters()["duplicates"] == 5  # the seen ids came back


def test_checkpoint_overwrite_is_atomic_and_replaces(tmp_path):
    lrn = Learner(tiny_split(seed=0), config())
    lrn.add(trajs(3))
    lrn.save_checkpoint(tmp_path / "ckpt")
    lrn.train_step()
    lrn.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    other = Learner(tiny_split(seed=0), config())
    other.load_checkpoint(tmp_path / "ckpt")
    assert other.step == 1


@pytest.mark.parametrize("foreign", ["another model", "another exit layer"])
def test_foreign_checkpoint_is_refused_and_nothing_changes(tmp_path, foreign):
    theirs = Learner(tiny_split(seed=1) if foreign == "another model" else tiny_split(seed=0, exit_layer=3), config())
    theirs.add(trajs(3, exit_layer=theirs.split.exit_layer))
    theirs.train_step()
    theirs.save_checkpoint(tmp_path / "theirs")

    mine = Learner(tiny_split(seed=0), config())
    mine.add(trajs(3, start=20))
    mine.train_step()
    before = learner_state(mine)
    match = "tiny-llama-1" if foreign == "another model" else "exit layer 3"
    with pytest.raises(AdapterError, match=match):
        mine.load_checkpoint(tmp_path / "theirs")
    assert_same_state(learner_state(mine), before)


@pytest.mark.parametrize("victim", ["adapter/adapter_model.safetensors", "learner_state.safetensors",
                                    "replay.msgpack", "learner.json", "adapter/dvi_adapter.json"])
def test_corrupt_checkpoint_is_refused_and_nothing_changes(tmp_path, victim):
    lrn = Learner(tiny_split(seed=0), config())
    lrn.add(trajs(3))
    lrn.train_step()
    ckpt = lrn.save_checkpoint(tmp_path / "ckpt")
    (ckpt / victim).write_bytes(b"\x00garbage\xff" * 3)
    files = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    mine = Learner(tiny_split(seed=0), config())
    mine.add(trajs(2, start=30))
    mine.train_step()
    before = learner_state(mine)
    with pytest.raises(AdapterError, match="corrupt"):
        mine.load_checkpoint(ckpt)
    assert_same_state(learner_state(mine), before)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == files  # nothing rewritten


def test_missing_checkpoint_is_refused(tmp_path):
    lrn = Learner(tiny_split(seed=0), config())
    with pytest.raises(AdapterError, match="not found"):
        lrn.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="missing"):
        lrn.load_checkpoint(tmp_path / "empty")


def test_saved_adapter_loads_with_plain_peft(tmp_path):
    split = tiny_split(seed=0)
    lrn = Learner(split, config(head_lr=3e-2, lora_lr=3e-2))
    lrn.add(trajs(4))
    for _ in range(3):
        lrn.train_step()
    ckpt = lrn.save_checkpoint(tmp_path / "ckpt")

    # the base ExitHead exactly as SplitModel builds it: a copy of the init layer, the final norm, the LM head
    layer = copy.deepcopy(split.layers[split.drafter_config.init_layer_for(split.num_layers)])
    layer.self_attn.layer_idx = 0
    base = ExitHead(layer, copy.deepcopy(split.decoder.norm), copy.deepcopy(split.model.lm_head))
    head = peft.PeftModel.from_pretrained(base, str(ckpt / "adapter")).eval()

    hidden = trajs(1, start=40)[0].hidden.float()  # [T, H]
    x = hidden[None]
    pos = torch.arange(x.shape[1])[None]
    with torch.no_grad():
        theirs = head(x, split.decoder.rotary_emb(x, pos), causal_mask(x.shape[1], 0, x.dtype, x.device), None, pos)[0]
        mine = split.drafter_logits(hidden, torch.arange(x.shape[1]))
    assert torch.allclose(theirs, mine, atol=1e-5)
    untrained = tiny_split(seed=0)
    with torch.no_grad():
        assert not torch.allclose(untrained.drafter_logits(hidden, torch.arange(x.shape[1])), mine, atol=1e-3)


def test_learner_config_is_used_for_param_groups():
    split = tiny_split(seed=0)
    lrn = Learner(split, config(head_lr=1e-2, lora_lr=2e-3, head_weight_decay=0.5))
    groups = {g["name"]: g for g in lrn.optimizer.param_groups}
    assert (groups["head"]["lr"], groups["head"]["weight_decay"], groups["lora"]["lr"]) == (1e-2, 0.5, 2e-3)
    n_head = sum(1 for n in split.named_trainable_parameters() if "lm_head" in n)
    assert (len(groups["head"]["params"]), len(groups["lora"]["params"])) == (n_head, len(split.trainable_parameters()) - n_head)
    assert dataclasses.is_dataclass(lrn.config)


# ----------------------------------------------------------------------------- verified rows, draft vocabulary
def test_verified_rows_alone_train_the_drafter_by_kl():
    split = tiny_split(seed=0)
    lrn = Learner(split, config(schedule=ScheduleConfig(kind="kl-only"), batch_tokens=8))
    # no drafted token at all (a context-drafted or AR request): only the verifier's distributions
    data = [make_trajectory(0, n_context=14, hidden=H, vocab=V, k=8, seed=i, exit_layer=2, n_verified=10) for i in range(3)]
    assert lrn.add(data) == 3 and lrn.ready()
    before = snapshot(split)
    stats = lrn.train_step()
    assert stats["skipped"] == 0.0 and stats["kl"] > 0.0 and stats["tokens"] >= 8
    after = snapshot(split)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all("lora_" in n or ".modules_to_save." in n for n in moved)


def test_reduced_vocabulary_trains_in_draft_space_and_learns_from_traffic(tmp_path):
    from common.core.config import DrafterConfig
    from common.model.split import SplitModel
    from tests.tiny_models import tiny_llama

    def reduced_split():
        return SplitModel(tiny_llama(seed=0), None, DrafterConfig(exit_layer=2, lora_rank=4, lora_alpha=8, draft_vocab_size=12), "tiny")

    split = reduced_split()
    assert split.draft_vocab.tolist() == list(range(12))  # before traffic: the lowest ids (EOS 2 among them)
    lrn = Learner(split, config(batch_tokens=16))
    data = [make_trajectory(8, hidden=H, vocab=V, k=8, seed=i, exit_layer=2, n_verified=2) for i in range(4)]
    lrn.add(data)
    counts = torch.zeros(V, dtype=torch.int64)
    for t in data:
        counts.index_add_(0, t.tokens, torch.ones_like(t.tokens))
    assert torch.equal(lrn.token_counts, counts)
    stats = lrn.train_step()  # tokens outside the vocabulary drop out; the step stays finite
    assert stats["skipped"] == 0.0
    lrn.publish_version()
    ranked = [t for t in torch.sort(-counts.double(), stable=True).indices.tolist() if t != 2]
    expected = sorted(ranked[:11] + [2])  # the 11 most frequent tokens, and EOS
    assert split.draft_vocab.tolist() == expected
    assert lrn.train_step()["skipped"] == 0.0
    lrn.save_checkpoint(tmp_path / "ckpt")
    resumed = Learner(reduced_split(), config(batch_tokens=16))
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(resumed.token_counts, counts)
    assert resumed.split.draft_vocab.tolist() == expected


def test_learner_fine_tunes_a_drafter_loaded_from_trained_weights(tmp_path):
    """A split whose drafter came from a saved adapter (or a warm start) starts trained: its
    learner runs every group at LearnerConfig.fine_tune_lr; a fresh drafter keeps the
    from-scratch rates."""
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from tests.tiny_models import tiny_split

    fresh = tiny_split(seed=3)
    assert not fresh.starts_trained
    assert {g["lr"] for g in Learner(fresh, LearnerConfig()).optimizer.param_groups} <= {3e-3, 1e-3}
    fresh.save_adapter(tmp_path / "adapter")
    loaded = tiny_split(seed=3)
    loaded.load_adapter(tmp_path / "adapter")
    assert loaded.starts_trained
    assert {g["lr"] for g in Learner(loaded, LearnerConfig()).optimizer.param_groups} == {1e-4}
