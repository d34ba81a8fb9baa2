"""Replay of recorded trajectories: a bounded FIFO counted in scored positions, staleness, collation.

The generators draft with the adapter version they last received; every `Trajectory` carries that
`weight_version`. The learner keeps a FIFO of recent trajectories (the paper's reference code
replays >= 4096 tokens), drops or reweights those too many versions old (trap 5 of the reference
code: it replayed stale entries as if on-policy), samples whole trajectories per step, and
`collate`s them into flat per-token tensors. Running the exit head over each trajectory's
`hidden` context is the model's job (`SplitModel.drafter_logits`), not this module's.

Everything here is pure: the eviction policy is a function passed in, randomness comes from a
`torch.Generator` passed in, so a seeded run samples the same batches.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from common.core.types import Trajectory

EvictionPolicy = Callable[[Sequence[Trajectory], int], Sequence[int]]
"""(buffer contents oldest first, capacity in scored positions) -> indices to evict; afterwards
the remaining trajectories must hold at most `capacity` scored positions."""


def drop_oldest(trajs: Sequence[Trajectory], capacity_tokens: int) -> list[int]:
    """Evict trajectories that alone exceed `capacity_tokens` (they can never fit, and must not
    flush the buffer), then the oldest, until the rest holds <= `capacity_tokens` scored positions."""
    evict = [i for i, t in enumerate(trajs) if t.num_scored > capacity_tokens]
    total = sum(t.num_scored for t in trajs) - sum(trajs[i].num_scored for i in evict)
    for i, t in enumerate(trajs):
        if total <= capacity_tokens:
            break
        if t.num_scored > capacity_tokens:
            continue
        evict.append(i)
        total -= t.num_scored
    return sorted(evict)


# ----------------------------------------------------------------------------- staleness
def is_stale(weight_version: int, current_version: int, max_staleness: int) -> bool:
    """True when `weight_version < current_version - max_staleness`."""
    return weight_version < current_version - max_staleness


def filter_stale(
    trajs: Sequence[Trajectory], current_version: int, max_staleness: int, policy: str
) -> tuple[list[Trajectory], int]:
    """Apply the staleness policy to `trajs` (order kept).

    policy "drop": trajectories with weight_version < current_version - max_staleness are dropped;
    policy "importance": all are kept (the PG term reweights them, see `importance_weights`).
    Returns (kept, n_dropped).
    """
    if policy not in ("drop", "importance"):
        raise ValueError(f"staleness policy must be 'drop' or 'importance', got {policy!r}")
    if current_version < 0:
        raise ValueError(f"current_version must be >= 0, got {current_version}")
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    if policy == "importance":
        return list(trajs), 0
    kept = [t for t in trajs if not is_stale(t.weight_version, current_version, max_staleness)]
    return kept, len(trajs) - len(kept)


def importance_weights(
    current_logprob: torch.Tensor,  # [N] float, log q_current(token)
    behaviour_logprob: torch.Tensor,  # [N] float, log q_behaviour(token) (Trajectory.drafter_logprob)
    clip: float,
) -> torch.Tensor:
    """Clipped importance ratios min(exp(log q_current - log q_behaviour), clip), detached, [N] float32.

    Both log-probs must be taken the same way (same temperature) for the ratio to mean anything;
    for a token drafted by the current weights the ratio is 1.
    """
    if not clip > 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")
    if current_logprob.shape != behaviour_logprob.shape:
        raise ValueError(f"current_logprob {tuple(current_logprob.shape)} and behaviour_logprob "
                         f"{tuple(behaviour_logprob.shape)} differ in shape")
    ratio = torch.exp(current_logprob.detach().float() - behaviour_logprob.detach().float().to(current_logprob.device))
    return ratio.clamp(min=0.0, max=clip)


# ----------------------------------------------------------------------------- buffer
class ReplayBuffer:
    """Bounded FIFO of trajectories; its capacity counts scored positions (drafted tokens plus
    extra verified positions: the rows a training step computes), not trajectories.

    Counters: added / added_tokens (accepted into the buffer), evicted / evicted_tokens (pushed out
    by the eviction policy), dropped_stale / dropped_stale_tokens (removed by `drop_stale`),
    skipped_empty (trajectories with no scored position, never stored).
    """

    def __init__(self, capacity_tokens: int, evict: EvictionPolicy = drop_oldest):
        if capacity_tokens < 1:
            raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
        self.capacity_tokens = int(capacity_tokens)
        self._evict = evict
        self._trajs: list[Trajectory] = []
        self._num_tokens = 0
        self.added = 0
        self.added_tokens = 0
        self.evicted = 0
        self.evicted_tokens = 0
        self.dropped_stale = 0
        self.dropped_stale_tokens = 0
        self.skipped_empty = 0

    def __len__(self) -> int:
        return len(self._trajs)

    @property
    def num_tokens(self) -> int:
        """Drafted tokens currently held."""
        return self._num_tokens

    def trajectories(self) -> tuple[Trajectory, ...]:
        """The contents, oldest first."""
        return tuple(self._trajs)

    def counters(self) -> dict[str, int]:
        return {
            "added": self.added,
            "added_tokens": self.added_tokens,
            "evicted": self.evicted,
            "evicted_tokens": self.evicted_tokens,
            "dropped_stale": self.dropped_stale,
            "dropped_stale_tokens": self.dropped_stale_tokens,
            "skipped_empty": self.skipped_empty,
            "size": len(self._trajs),
            "num_tokens": self._num_tokens,
        }

    def add(self, traj: Trajectory) -> bool:
        """Append `traj`, then evict by the policy; True if `traj` is still held afterwards."""
        if not isinstance(traj, Trajectory):
            raise ValueError(f"ReplayBuffer.add takes a Trajectory, got {type(traj).__name__}")
        if traj.num_scored == 0:
            self.skipped_empty += 1
            return False
        self._trajs.append(traj)
        self._num_tokens += traj.num_scored
        self.added += 1
        self.added_tokens += traj.num_scored

        evict = sorted(set(int(i) for i in self._evict(tuple(self._trajs), self.capacity_tokens)))
        if evict and not (0 <= evict[0] and evict[-1] < len(self._trajs)):
            raise ValueError(f"eviction policy returned indices {evict} outside [0, {len(self._trajs)})")
        gone = set(evict)
        for i in evict:
            self.evicted += 1
            self.evicted_tokens += self._trajs[i].num_scored
            self._num_tokens -= self._trajs[i].num_scored
        still_held = (len(self._trajs) - 1) not in gone
        self._trajs = [t for i, t in enumerate(self._trajs) if i not in gone]
        if self._num_tokens > self.capacity_tokens:
            raise ValueError(
                f"eviction policy left {self._num_tokens} tokens in a buffer of {self.capacity_tokens}"
            )
        return still_held

    def drop_stale(self, current_version: int, max_staleness: int, policy: str) -> int:
        """Apply `filter_stale` to the contents; returns (and counts) the trajectories dropped."""
        kept, n_dropped = filter_stale(self._trajs, current_version, max_staleness, policy)
        if n_dropped:
            kept_ids = {id(t) for t in kept}
            lost = sum(t.num_scored for t in self._trajs if id(t) not in kept_ids)
            self.dropped_stale += n_dropped
            self.dropped_stale_tokens += lost
            self._num_tokens -= lost
            self._trajs = kept
        return n_dropped

    def sample(self, batch_tokens: int, generator: torch.Generator) -> list[Trajectory]:
        """Whole trajectories, uniformly without replacement (a `randperm` under `generator`), taken
        until they hold >= `batch_tokens` scored positions or the buffer is exhausted.

        The batch overshoots `batch_tokens` by less than one trajectory. Sampled trajectories stay
        in the buffer. Empty buffer -> [].
        """
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"sample needs a torch.Generator, got {type(generator).__name__}")
        out: list[Trajectory] = []
        total = 0
        for i in torch.randperm(len(self._trajs), generator=generator).tolist():
            if total >= batch_tokens:
                break
            out.append(self._trajs[i])
            total += self._trajs[i].num_scored
        return out


# ----------------------------------------------------------------------------- collation
class TrainBatch(NamedTuple):
    """The per-row fields of several trajectories, concatenated in `trajectories` order.

    N = total drafted tokens, M = total extra verified positions, K = the largest recorded top-K
    (narrower rows are padded with id 0 and log-prob -inf, i.e. probability 0, which every loss
    ignores).
      trajectories: tuple[Trajectory, ...]  the sources, for running the exit head on `hidden`.
      traj_index: [N] int64            index into `trajectories` of each token's source.
      position: [N] int64              index into that trajectory's `hidden`.
      block_index: [N] int64           place in the draft block.
      token: [N] int64                 drafted token (the PG action).
      target_token: [N] int64          verifier's committed token (the CE target).
      accepted: [N] bool               accept flag.
      reward: [N] float32              accepted as 1.0 / 0.0.
      drafter_logprob: [N] float32     behaviour log q(token).
      verifier_topk_ids: [N, K] int64
      verifier_topk_logprobs: [N, K] float32
      weight_version: [N] int64        drafting adapter version of each token's trajectory.
      verified_traj_index / verified_position: [M] int64   source and position of each extra
                                       verified row (a distillation target only).
      verified_topk_ids: [M, K] int64
      verified_topk_logprobs: [M, K] float32
    """

    trajectories: tuple[Trajectory, ...]
    traj_index: torch.Tensor
    position: torch.Tensor
    block_index: torch.Tensor
    token: torch.Tensor
    target_token: torch.Tensor
    accepted: torch.Tensor
    reward: torch.Tensor
    drafter_logprob: torch.Tensor
    verifier_topk_ids: torch.Tensor
    verifier_topk_logprobs: torch.Tensor
    weight_version: torch.Tensor
    verified_traj_index: torch.Tensor
    verified_position: torch.Tensor
    verified_topk_ids: torch.Tensor
    verified_topk_logprobs: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Rows a step trains on: drafted tokens plus extra verified positions."""
        return int(self.token.shape[0] + self.verified_position.shape[0])

    def sizes(self) -> list[int]:
        """Drafted tokens per trajectory, in order (split sizes of the drafted fields)."""
        return [t.num_drafted for t in self.trajectories]

    def verified_sizes(self) -> list[int]:
        """Extra verified positions per trajectory, in order."""
        return [t.num_verified for t in self.trajectories]

    def to(self, device: torch.device | str) -> "TrainBatch":
        """A copy with every flat tensor on `device` (the trajectories themselves are not moved)."""
        return self._replace(
            **{name: getattr(self, name).to(device) for name in self._fields if name != "trajectories"}
        )


def _padded_topk(ids: torch.Tensor, logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, k'] top-K rows widened to [R, k] with id 0 / log-prob -inf (probability 0)."""
    ids, logprobs = ids.cpu(), logprobs.cpu().float()
    extra = k - ids.shape[1]
    if extra:
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], dim=1)
        logprobs = torch.cat([logprobs, logprobs.new_full((logprobs.shape[0], extra), float("-inf"))], dim=1)
    return ids, logprobs


def collate(trajs: Sequence[Trajectory]) -> TrainBatch:
    """Concatenate the per-row fields of `trajs` (at least one) into a `TrainBatch` (on CPU)."""
    if not trajs:
        raise ValueError("collate needs at least one trajectory")
    k = max(max(int(t.verifier_topk_ids.shape[1]), int(t.verified_topk_ids.shape[1])) for t in trajs)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(t, name).cpu() for t in trajs])

    drafted = [_padded_topk(t.verifier_topk_ids, t.verifier_topk_logprobs, k) for t in trajs]
    verified = [_padded_topk(t.verified_topk_ids, t.verified_topk_logprobs, k) for t in trajs]
    order = torch.arange(len(trajs), dtype=torch.int64)
    sizes = torch.tensor([t.num_drafted for t in trajs], dtype=torch.int64)
    accepted = cat("accepted").bool()
    return TrainBatch(
        trajectories=tuple(trajs),
        traj_index=torch.repeat_interleave(order, sizes),
        position=cat("position").long(),
        block_index=cat("block_index").long(),
        token=cat("token").long(),
        target_token=cat("target_token").long(),
        accepted=accepted,
        reward=accepted.float(),
        drafter_logprob=cat("drafter_logprob").float(),
        verifier_topk_ids=torch.cat([ids for ids, _ in drafted]),
        verifier_topk_logprobs=torch.cat([lp for _, lp in drafted]),
        weight_version=torch.repeat_interleave(
            torch.tensor([t.weight_version for t in trajs], dtype=torch.int64), sizes
        ),
        verified_traj_index=torch.repeat_interleave(order, torch.tensor([t.num_verified for t in trajs], dtype=torch.int64)),
        verified_position=cat("verified_position").long(),
        verified_topk_ids=torch.cat([ids for ids, _ in verified]),
        verified_topk_logprobs=torch.cat([lp for _, lp in verified]),
    )
