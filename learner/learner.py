"""The online learner of DVI: a plain class that turns recorded trajectories into drafter updates.

Draft, Verify, and Improve (arXiv 2510.05421) trains the drafter from its own verification traffic.
One `Learner` owns a `SplitModel`'s trainable exit head (LoRA tensors only; the verifier is frozen
and never receives a gradient), an AdamW optimiser, the EMA reward baseline, a FIFO replay of
trajectories, and the weight version. It is plain Python: `learner/service.py` makes it a Ray actor,
`learner/local.py` drives it in-process; neither adds math.

  add(trajs)          dedupe by request_id, apply the staleness policy, push into the replay
  train_step()        sample whole trajectories (seeded), re-run the exit head over each one's recorded
                      layer-k context (`SplitModel.drafter_logits`: context-correct, trap 5 of the
                      reference code), `combined_loss` with the schedule weights of the current step,
                      clip, AdamW; a non-finite loss or gradient skips the update and is counted
  publish_version()   bump the weight version (the caller ships `split.adapter_state()`)
  save/load_checkpoint  everything above, bit-exact (see `learner.checkpoint`)

Off-policy correction. Every replayed token is sampled again after the weights moved, so the
policy-gradient term of every token is weighted by the clipped ratio
min(q_now(token) / q_behaviour(token), importance_clip) (`_pg_weights`; 1 for a token drafted by the
current weights). Without it REINFORCE is unbounded on a rejected token: lowering log q(token) keeps
lowering the loss at the same rate however small q(token) already is, and with greedy drafting and a
replay the same rejections are pushed again and again (on stories260K, kl-rl without the ratio fell
from 0.10 to 0.05 held-out acceptance while kl-only rose to 0.33; with it kl-rl reaches 0.38).

Staleness: a trajectory drafted by version v is stale once v < version - max_staleness. Policy
"drop" discards it (on arrival, and from the replay whenever the version moves); policy
"importance" keeps it (the FIFO capacity still bounds the replay), relying on the ratio above.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from common.model.draft_vocab import count_tokens, draft_index, has_mass, restrict_topk, select_draft_vocab
from common.core.errors import AdapterError
from common.model.split import SplitModel
from common.core.types import Trajectory, TrajectoryError
from learner.checkpoint import CheckpointContents, read_checkpoint, write_checkpoint
from learner.config import LearnerConfig
from learner.dedupe import SeenWindow
from learner.losses import EmaBaseline, combined_loss
from learner.replay import ReplayBuffer, TrainBatch, collate, importance_weights
from learner.schedule import batch_weights, schedule_weights

log = logging.getLogger(__name__)

COUNTER_NAMES = ("added", "duplicates", "stale_dropped", "skipped_steps", "steps", "tokens_seen")
_OPTIM_PREFIX = "optim/"
_RNG_SAMPLER = "rng/sampler"
_RNG_TORCH = "rng/torch"
_TOKEN_COUNTS = "vocab/token_counts"


@dataclass(frozen=True)
class DraftSpaceIds:
    """A batch's token ids as indices into the draft vocabulary, where the drafter's logits live.

    token / target [N] long (an id outside the vocabulary maps to the token's index, or 0, and its
    row is not `valid`: the vocabulary changed since it was drafted); topk_ids / topk_logprobs
    [N, K] and extra_ids / extra_logprobs [M, K] with outside ids at probability 0; valid [N] bool
    (rows every loss may use); keep [M] bool (extra rows with verifier mass left).
    """

    token: torch.Tensor
    target: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    valid: torch.Tensor
    extra_ids: torch.Tensor
    extra_logprobs: torch.Tensor
    keep: torch.Tensor


class Learner:
    """Trains `split`'s exit-head adapter from trajectories (plain class; see the module docstring).

    Attributes: split, config, learner_id, version (weight version of the adapter being trained,
    always == split.weight_version), step (optimiser steps taken; the schedule's step), optimizer,
    baseline (EmaBaseline), replay (ReplayBuffer).
    """

    def __init__(self, split: SplitModel, config: LearnerConfig, learner_id: str = "learner-0"):
        if not isinstance(config, LearnerConfig):
            raise ValueError(f"config must be a LearnerConfig, got {type(config).__name__}")
        frozen = [n for n, p in split.model.named_parameters() if p.requires_grad]
        assert not frozen, f"the base model must be frozen; trainable: {frozen[:3]}"
        self.split = split
        self.config = config
        self.learner_id = learner_id
        self.version = int(split.weight_version)
        self.step = 0
        self._named = dict(split.named_trainable_parameters())  # peft name -> LoRA parameter
        assert self._named, "the drafter has no trainable parameter"
        groups = config.param_groups(self._named.items(), fine_tune=split.starts_trained)
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]} for g in groups]
        )
        self._name_of = {id(p): n for n, p in self._named.items()}
        self.baseline = EmaBaseline(config.baseline_ema)
        self.replay = ReplayBuffer(config.replay_capacity_tokens)
        self.sampler = torch.Generator().manual_seed(config.seed)
        # Under "drop" an id older than max_staleness versions is stale anyway; under "importance"
        # old trajectories stay usable, so their ids are kept longer (learner.dedupe).
        self._seen = SeenWindow(config.max_staleness if config.staleness_policy == "drop" else max(64, config.max_staleness))
        self._counters = {name: 0 for name in COUNTER_NAMES}
        self.token_counts = torch.zeros(split.vocab_size, dtype=torch.int64)  # traffic tokens, for the draft vocabulary

    # ------------------------------------------------------------------ data in
    def add(self, trajectories: Iterable[Trajectory]) -> int:
        """Dedupe by request_id, drop stale ones (policy "drop"), push the rest into the replay.

        Every trajectory is checked first (shape contract, exit layer, hidden size): a bad one
        raises ValueError naming its request and nothing is added. Returns how many were added.
        """
        trajs = list(trajectories)
        for t in trajs:
            if not isinstance(t, Trajectory):
                raise ValueError(f"Learner.add takes Trajectory records, got {type(t).__name__}")
            try:
                t.validate()
            except TrajectoryError as exc:
                raise ValueError(f"trajectory {t.request_id!r}: {exc}") from None
            if t.exit_layer != self.split.exit_layer:
                raise ValueError(
                    f"trajectory {t.request_id!r} was drafted at exit layer {t.exit_layer}, "
                    f"this learner trains exit layer {self.split.exit_layer}"
                )
            if t.num_context and t.hidden.shape[1] != self.split.hidden_size:
                raise ValueError(
                    f"trajectory {t.request_id!r} has hidden size {t.hidden.shape[1]}, the model has {self.split.hidden_size}"
                )
        added = 0
        cfg = self.config
        for t in trajs:
            if not self._seen.add(t.request_id, t.weight_version):
                self._counters["duplicates"] += 1
                continue
            if cfg.staleness_policy == "drop" and t.weight_version < self.version - cfg.max_staleness:
                self._counters["stale_dropped"] += 1
                continue
            self.replay.add(t)
            count_tokens(self.token_counts, t.tokens)
            added += 1
            self._counters["added"] += 1
            self._counters["tokens_seen"] += t.num_scored
        return added

    def ready(self) -> bool:
        """True when the replay holds at least `batch_tokens` scored positions."""
        return self.replay.num_tokens >= self.config.batch_tokens

    # ------------------------------------------------------------------ update
    def train_step(self) -> dict[str, float | str] | None:
        """One AdamW update from a replay sample; None when not `ready()`.

        Stats: step (optimiser steps taken after this call), phase, lambda_kl/ce/pg, kl, ce, pg,
        entropy, reward_mean, baseline, grad_norm, tokens, step_seconds, skipped (1.0 when the
        NaN/inf guard skipped the update: no optimiser step, the schedule step does not advance),
        plus version, loss and top1_agreement.
        """
        if not self.ready():
            return None
        started = time.perf_counter()
        cfg = self.config
        batch = collate(self.replay.sample(cfg.batch_tokens, self.sampler)).to(self.split.device)
        drafted = batch.reward.numel() > 0  # a batch of verified rows only has no reward
        reward_mean = float(batch.reward.mean()) if drafted else 0.0
        baseline = self.baseline.current(reward_mean)
        loss, stats, weights = self._loss(batch, baseline)
        grad_norm, skipped = self._apply(loss)
        if not skipped and drafted:
            self.baseline.update(reward_mean)
        losses = {name: float(stats[name]) for name in ("loss", "kl", "ce", "pg", "entropy", "top1_agreement")}
        return {
            "step": float(self.step), "version": float(self.version), "phase": weights.phase,
            "lambda_kl": float(weights.lambda_kl), "lambda_ce": float(weights.lambda_ce),
            "lambda_pg": float(weights.lambda_pg), **losses, "reward_mean": reward_mean,
            "baseline": float(baseline), "grad_norm": grad_norm, "tokens": float(batch.num_tokens),
            "step_seconds": time.perf_counter() - started, "skipped": 1.0 if skipped else 0.0,
        }

    def _loss(self, batch: TrainBatch, baseline: float):
        """(loss, its stats, the loss weights used) of one batch, with gradients zeroed first and
        the exit head in train mode only while the graph is built."""
        cfg, split = self.config, self.split
        weights = schedule_weights(self.step, cfg.schedule)
        self.optimizer.zero_grad(set_to_none=True)
        split.exit_head.train()  # LoRA dropout, if configured, is on while training only
        try:
            logits, verified_logits = self._drafter_logits(batch)  # [N, V'], [M, V'] float32, grad through LoRA only
            ids = self._in_draft_space(batch)
            keep = ids.keep
            drafted_rows = int(ids.valid.sum())
            weights = batch_weights(weights, drafted_rows, drafted_rows + int(keep.sum()))
            loss, stats = combined_loss(
                logits, token=ids.token, target_token=ids.target, reward=batch.reward,
                verifier_topk_ids=ids.topk_ids, verifier_topk_logprobs=ids.topk_logprobs, weights=weights,
                baseline=baseline, kl_temperature=cfg.kl_temperature,
                importance_weight=self._pg_weights(batch, logits, ids.token), valid=ids.valid,
                extra_kl=(verified_logits[keep], ids.extra_ids[keep], ids.extra_logprobs[keep]),
            )
            if torch.isfinite(loss):
                loss.backward()
        finally:
            split.exit_head.eval()
        return loss, stats, weights

    def _apply(self, loss: torch.Tensor) -> tuple[float, bool]:
        """Clip and take the optimiser step unless the loss or the gradient norm is not finite
        (then nothing changes and the schedule step does not advance); returns (grad norm, skipped)."""
        cfg = self.config
        finite = bool(torch.isfinite(loss))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float("nan")
        if finite:
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        skipped = not (finite and math.isfinite(grad_norm))
        if skipped:
            # NaN/inf guard (the reference code saw NaNs in fp16): no update, no schedule step.
            self.optimizer.zero_grad(set_to_none=True)
            self._counters["skipped_steps"] += 1
            log.warning("%s: skipped a non-finite update at step %d (loss %s, grad norm %s)",
                        self.learner_id, self.step, float(loss.detach()), grad_norm)
            return grad_norm, True
        self.optimizer.step()
        self.split.adapter_changed()  # the fast engine's merged copy of the exit head is stale now
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._counters["steps"] = self.step
        return grad_norm, False

    def _drafter_logits(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """q's logits over the draft vocabulary, float32: ([N, V'] at the drafted tokens,
        [M, V'] at the extra verified positions), the exit head run once over each trajectory's
        whole recorded context."""
        drafted, verified = [], []
        vocab = self.split.draft_vocab if self.split.draft_vocab.shape[0] < self.split.vocab_size else None
        for t in batch.trajectories:
            at = torch.cat([t.position, t.verified_position])
            # clone(): records made under torch.inference_mode (an in-process decoder) cannot enter autograd
            rows = self.split.drafter_logits(t.hidden.clone(), at.clone(), rows=vocab)  # [n_t + m_t, V']
            drafted.append(rows[: t.num_drafted])
            verified.append(rows[t.num_drafted :])
        return torch.cat(drafted), torch.cat(verified)

    def _in_draft_space(self, batch: TrainBatch) -> DraftSpaceIds:
        """The batch's ids mapped into the current draft vocabulary (see `DraftSpaceIds`)."""
        lookup = draft_index(self.split.draft_vocab, self.split.vocab_size)
        token, target = lookup[batch.token], lookup[batch.target_token]
        topk_ids, topk_logprobs = restrict_topk(batch.verifier_topk_ids, batch.verifier_topk_logprobs, lookup)
        extra_ids, extra_logprobs = restrict_topk(batch.verified_topk_ids, batch.verified_topk_logprobs, lookup)
        scored = has_mass(topk_logprobs)
        return DraftSpaceIds(
            token=token.clamp_min(0),
            target=torch.where(target >= 0, target, token.clamp_min(0)),  # CE reads accepted rows only
            topk_ids=topk_ids,
            topk_logprobs=torch.where(scored[:, None], topk_logprobs, torch.zeros_like(topk_logprobs)),  # weight 0, finite
            valid=(token >= 0) & scored,
            extra_ids=extra_ids,
            extra_logprobs=extra_logprobs,
            keep=has_mass(extra_logprobs),
        )

    def _pg_weights(self, batch: TrainBatch, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """[N] detached PG weights min(q_now(token) / q_behaviour(token), importance_clip).

        logits [N, V'] and token [N] (indices) in draft-vocabulary space, where the behaviour
        log-probs were taken. Every replayed token is off-policy to some degree (it is sampled
        again after updates), so the ratio applies to all of them, under both staleness policies;
        a token drafted by the current weights gets ratio 1. Without it the PG term is unbounded on
        a rejected token (pushing log q(token) to -inf keeps lowering the loss at the same rate,
        trap 5 again), and the reused rejections of the replay drive the drafter away from the
        verifier.
        """
        # The drafter recorded log q at its decoding temperature (temperature 1 when greedy).
        temps = torch.tensor(
            [t.temperature if t.temperature > 0 else 1.0 for t in batch.trajectories], device=logits.device
        )[batch.traj_index.to(logits.device)]
        current = torch.log_softmax(logits.detach() / temps[:, None], dim=-1).gather(-1, token[:, None]).squeeze(-1)
        return importance_weights(current, batch.drafter_logprob, self.config.importance_clip)

    def refresh_draft_vocab(self) -> bool:
        """Re-pick a reduced drafter's vocabulary from the traffic counted so far (the most
        frequent tokens, EOS always in, ties kept by the current vocabulary: a warm start's stays
        where traffic has not outranked it); True when it changed. A full-vocabulary drafter: False."""
        size = self.split.draft_vocab_size
        if not size:
            return False
        vocab = select_draft_vocab(self.token_counts, size, self.split.eos_token_ids, prefer=self.split.draft_vocab)
        if torch.equal(vocab, self.split.draft_vocab.cpu()):
            return False
        self.split.set_draft_vocab(vocab)
        return True

    # ------------------------------------------------------------------ versions
    def publish_version(self) -> int:
        """version += 1 (and on the split), with the draft vocabulary re-picked from the traffic;
        stale replay entries are dropped under policy "drop"."""
        self.refresh_draft_vocab()
        self.version += 1
        self.split.weight_version = self.version
        self._seen.prune(self.version)
        if self.config.staleness_policy == "drop":
            self._counters["stale_dropped"] += self.replay.drop_stale(self.version, self.config.max_staleness, "drop")
        return self.version

    def seen_count(self) -> int:
        """Request ids in the dedupe window (bounded: learner.dedupe.SeenWindow)."""
        return len(self._seen)

    def counters(self) -> dict[str, int]:
        """added, duplicates, stale_dropped, skipped_steps, steps, tokens_seen (scored positions added:
        drafted tokens plus extra verified positions)."""
        return dict(self._counters)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write everything needed to resume bit-identically to `directory` (atomic; see learner.checkpoint)."""
        tensors: dict[str, torch.Tensor] = {}
        state = self.optimizer.state_dict()["state"]
        index_to_name = {i: self._name_of[id(p)] for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        for index, moments in state.items():
            for key, value in moments.items():
                tensors[f"{_OPTIM_PREFIX}{index_to_name[index]}/{key}"] = torch.as_tensor(value).detach().cpu().clone()
        tensors[_RNG_SAMPLER] = self.sampler.get_state()
        tensors[_TOKEN_COUNTS] = self.token_counts.clone()
        tensors[_RNG_TORCH] = torch.get_rng_state()
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            | {"param_names": [self._name_of[id(p)] for p in g["params"]]}
            for g in self.optimizer.param_groups
        ]
        meta = {
            "learner_id": self.learner_id,
            "step": self.step,
            "version": self.version,
            "model_id": self.split.model_id,
            "model_fingerprint": self.split.fingerprint,
            "exit_layer": self.split.exit_layer,
            "baseline": self.baseline.state_dict(),
            "counters": self.counters(),
            "replay_counters": {k: v for k, v in self.replay.counters().items() if k not in ("size", "num_tokens")},
            "seen_request_ids": self._seen.state(),
            "optimizer_param_groups": groups,
            "config": _jsonable(asdict(self.config)),
        }
        return write_checkpoint(directory, self.split.save_adapter, meta, tensors, list(self.replay.trajectories()))

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore a `save_checkpoint` directory exactly. AdapterError naming the problem (and no
        state changed) for a missing or corrupt file, or a checkpoint of another model / exit layer.

        The current LearnerConfig keeps its hyper-parameters (lr, decay, batch, replay capacity):
        only state is restored.
        """
        ckpt = read_checkpoint(directory)
        plan = self._validate(ckpt)
        # ---- nothing above changed this learner; from here on every step is known to succeed
        self.split.load_adapter_state(ckpt.adapter_tensors, plan["version"])
        self.optimizer.load_state_dict({"state": plan["optim_state"], "param_groups": self.optimizer.state_dict()["param_groups"]})
        self.baseline.load_state_dict(ckpt.meta["baseline"])
        self.step = plan["step"]
        self.version = plan["version"]
        self._counters = plan["counters"]
        self._seen.load(plan["seen"], plan["version"])
        replay = ReplayBuffer(self.config.replay_capacity_tokens)
        for t in ckpt.replay:
            replay.add(t)
        for key, value in plan["replay_counters"].items():
            setattr(replay, key, value)
        self.replay = replay
        self.sampler.set_state(plan["rng_sampler"])
        torch.set_rng_state(plan["rng_torch"])
        self.token_counts = plan["token_counts"]

    def _validate(self, ckpt: CheckpointContents) -> dict:
        """Check every part of `ckpt` against this learner without changing anything; the load plan.
        AdapterError naming the checkpoint and the part that does not fit."""
        meta = ckpt.meta
        self._validate_adapter(ckpt)
        optim_state = self._validated_optim_state(ckpt)
        rng, counts = self._validated_rng_and_counts(ckpt)
        self._validate_state(ckpt)
        return {
            "version": meta["version"],
            "step": meta["step"],
            "optim_state": optim_state,
            "counters": dict(meta["counters"]),
            "replay_counters": dict(meta["replay_counters"]),
            "seen": meta["seen_request_ids"],
            "rng_sampler": rng[_RNG_SAMPLER],
            "rng_torch": rng[_RNG_TORCH],
            "token_counts": counts.clone(),
        }

    def _validate_adapter(self, ckpt: CheckpointContents) -> None:
        """The checkpoint is this drafter's: model, exit layer, adapter tensor names, shapes, finite."""
        meta, where = ckpt.meta, ckpt.directory
        self.split.check_adapter_meta(ckpt.adapter_meta, f"checkpoint {where}")
        if meta.get("model_fingerprint") != self.split.fingerprint or meta.get("exit_layer") != self.split.exit_layer:
            raise AdapterError(
                f"checkpoint {where} belongs to model '{meta.get('model_id')}' at exit layer {meta.get('exit_layer')}, "
                f"not '{self.split.model_id}' at exit layer {self.split.exit_layer}"
            )
        current = self.split.adapter_state()
        if set(ckpt.adapter_tensors) != set(current):
            missing = sorted(set(current) - set(ckpt.adapter_tensors))[:3]
            extra = sorted(set(ckpt.adapter_tensors) - set(current))[:3]
            raise AdapterError(f"checkpoint {where}: adapter tensors do not match this drafter (missing {missing}, unexpected {extra})")
        for name, value in ckpt.adapter_tensors.items():
            if value.shape != current[name].shape or not torch.isfinite(value).all():
                raise AdapterError(f"checkpoint {where}: adapter tensor {name} has the wrong shape or non-finite values")

    def _validated_optim_state(self, ckpt: CheckpointContents) -> dict[int, dict[str, torch.Tensor]]:
        """AdamW state per parameter index, every moment of a known parameter with its shape."""
        where = ckpt.directory
        index_of = {self._name_of[id(p)]: i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in ckpt.tensors.items():
            if not key.startswith(_OPTIM_PREFIX):
                continue
            name, _, moment = key[len(_OPTIM_PREFIX):].rpartition("/")
            if name not in index_of:
                raise AdapterError(f"checkpoint {where}: optimiser state for unknown parameter {name}")
            if moment not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                raise AdapterError(f"checkpoint {where}: unknown optimiser state {moment!r} for {name}")
            if moment != "step" and value.shape != self._named[name].shape:
                raise AdapterError(f"checkpoint {where}: optimiser {moment} of {name} has shape {tuple(value.shape)}")
            optim_state.setdefault(index_of[name], {})[moment] = value
        for index, moments in optim_state.items():
            if not {"step", "exp_avg", "exp_avg_sq"} <= set(moments):
                raise AdapterError(f"checkpoint {where}: incomplete optimiser state (parameter #{index})")
        return optim_state

    def _validated_rng_and_counts(self, ckpt: CheckpointContents) -> tuple[dict, torch.Tensor]:
        """The two RNG states (each loadable) and the [V] non-negative int64 token counts."""
        where, rng = ckpt.directory, {}
        for key in (_RNG_SAMPLER, _RNG_TORCH):
            value = ckpt.tensors.get(key)
            try:
                torch.Generator().set_state(value)
            except (TypeError, RuntimeError, ValueError):
                raise AdapterError(f"checkpoint {where}: RNG state {key} is missing or corrupt") from None
            rng[key] = value
        counts = ckpt.tensors.get(_TOKEN_COUNTS, torch.zeros(self.split.vocab_size, dtype=torch.int64))
        if counts.dtype != torch.int64 or tuple(counts.shape) != (self.split.vocab_size,) or bool((counts < 0).any()):
            raise AdapterError(f"checkpoint {where}: token counts must be [{self.split.vocab_size}] non-negative int64")
        return rng, counts

    def _validate_state(self, ckpt: CheckpointContents) -> None:
        """Replay trajectories of this drafter; counters, seen ids, baseline, step and version well formed."""
        meta, where = ckpt.meta, ckpt.directory
        for t in ckpt.replay:
            if t.exit_layer != self.split.exit_layer or (t.num_context and t.hidden.shape[1] != self.split.hidden_size):
                raise AdapterError(f"checkpoint {where}: replay trajectory {t.request_id!r} is for another exit layer or model")
        counters = meta["counters"]
        if set(counters) != set(COUNTER_NAMES) or not all(isinstance(v, int) for v in counters.values()):
            raise AdapterError(f"checkpoint {where}: counters must be {COUNTER_NAMES}")
        if not all(isinstance(v, int) and hasattr(self.replay, k) for k, v in meta["replay_counters"].items()):
            raise AdapterError(f"checkpoint {where}: bad replay counters")
        try:
            SeenWindow(0).load(meta["seen_request_ids"], 0)
        except ValueError as exc:
            raise AdapterError(f"checkpoint {where}: {exc}") from None
        try:
            EmaBaseline().load_state_dict(meta["baseline"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"checkpoint {where}: bad baseline state {meta['baseline']!r}") from None
        if meta["step"] < 0 or meta["version"] < 0:
            raise AdapterError(f"checkpoint {where}: step and version must be >= 0")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
