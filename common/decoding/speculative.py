"""Lossless self-speculative decoding with a DVI split model.

One block:
  1. the last committed token runs through the shallow layers [0, k) -> h_k (in one pass with the
     context's draft, when the context has a match);
  2. a draft d_1..d_G is proposed, from one of two sources:
     * the context: when the sequence's last n tokens occurred before, the tokens that followed
       them (DecodeConfig.context_tokens; common/core/context_draft.py), or where they did not,
       what followed them in the requests this decoder served before (DecodeConfig.traffic_drafting;
       common/core/traffic_draft.py), run through the shallow layers in one batched pass;
     * the exit head on h_k, one token at a time, each drafted token also running through the
       shallow layers so its h_k is ready for verification; it stops below the confidence
       threshold, and adaptive gamma caps G at what pays (common/core/adaptive_gamma.py);
     when the context has a match, the source with more expected tokens per unit of cost drafts
     (common/core/arbitration.py: the match's length and acceptance history against the exit head's
     confidence and acceptance history);
  3. the verifier runs only the deep layers [k, L) on the G + 1 states in one pass;
  4. acceptance (greedy prefix match or rejection sampling) commits n_accepted + 1 tokens;
  5. every cache is cropped back to the committed sequence.
Either way the verifier alone decides what is committed, so the output is the model's own.

Cache invariant (the reference code breaks it, trap 1): between blocks the base caches hold
every committed token except the last one, and that last token is the first input of the next
block. The exit head's own cache may lag behind (when a block accepts everything, while gamma is
0, or across blocks drafted from the context): the states it has not seen yet are fed to it at
the next draft, so it never recomputes nor skips a position. `DecodeConfig.autoregressive()`
runs the same loop with no draft: plain AR.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from common.core.acceptance import greedy_accept, rejection_accept
from common.core.adaptive_gamma import DraftStats
from common.core.arbitration import CONTEXT, HEAD, ContextStats, best_context_length, choose_draft_source, worth_probing
from common.core.config import DecodeConfig
from common.core.context_draft import ContextIndex
from common.core.traffic_draft import TrafficIndex
from common.core.errors import RequestRejected
from common.model.split import SplitModel, crop_cache
from common.core.prompts import fit_to_context
from common.core.sampling import sample, warp
from common.core.types import Trajectory


@dataclass
class GenerationResult:
    """What one request produced.

    prompt_ids / token_ids: prompt and new tokens (new tokens stop after EOS or max_new_tokens);
    verifier_passes: deep passes run (one per block); drafted / accepted: tokens the exit head
    drafted / the verifier accepted of them; accepted_by_position[i]: exit-head drafts accepted at
    block position i, drafted_by_position likewise; context_drafted / context_accepted: the same for
    tokens drafted from the context (DecodeConfig.context_tokens), kept apart so that acceptance
    always measures the learned drafter; traffic_drafted / traffic_accepted: the part of those
    drafted from earlier requests' n-grams (DecodeConfig.traffic_drafting); head_over_context:
    blocks the exit head drafted although the context had a match (common/core/arbitration.py);
    trajectory: the learner's record when `record_trajectories` was set.
    """

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    verifier_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    context_drafted: int = 0
    context_accepted: int = 0
    traffic_drafted: int = 0
    traffic_accepted: int = 0
    head_over_context: int = 0
    finished_by_eos: bool = False
    seconds: float = 0.0
    weight_version: int = 0
    trajectory: Trajectory | None = None

    @property
    def tau(self) -> float:
        """Tokens committed per verifier pass (1.0 for autoregressive decoding)."""
        return len(self.token_ids) / self.verifier_passes if self.verifier_passes else 0.0

    @property
    def mean_accepted(self) -> float:
        """Deprecated name of `tau`, kept for one release."""
        return self.tau

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class TrajectoryRecorder:
    """Collects one request's learning records (struct of arrays, see common.core.types.Trajectory):
    a row per exit-head drafted token (accepted run + first rejection), and the verifier's
    distribution at every other committed position it scored."""

    def __init__(self, topk: int):
        self.topk = topk
        self.rows: dict[str, list] = {k: [] for k in (
            "position", "block_index", "token", "target_token", "accepted",
            "drafter_logprob", "ids", "logprobs", "timestamp")}
        self.verified: dict[str, list] = {"position": [], "ids": [], "logprobs": []}

    def add_block(self, pos0, drafts, draft_logprobs, n_accepted, next_token, target_logits, n_committed, by_head):
        """One verified block. Row i of target_logits [g + 1, V] scored the token at position
        pos0 + i + 1; rows past the `n_committed` tokens the block kept are not recorded. By the
        exit head: drafted rows 0..min(g - 1, n_accepted), the bonus row as verified; from the
        context or without drafts: every kept row as verified."""
        g = len(drafts)
        drafted = range(min(g, n_accepted + 1, n_committed)) if by_head else range(0)
        verified = [i for i in range(min(n_accepted + 1, n_committed)) if i not in drafted]
        if not drafted and not verified:
            return
        values, ids = self._topk(torch.log_softmax(target_logits[: max([*drafted, *verified]) + 1].float(), dim=-1))
        now = time.time()
        r = self.rows
        for i in drafted:
            r["position"].append(pos0 + i)
            r["block_index"].append(i)
            r["token"].append(drafts[i])
            r["target_token"].append(drafts[i] if i < n_accepted else next_token)
            r["accepted"].append(i < n_accepted)
            r["drafter_logprob"].append(draft_logprobs[i])
            r["ids"].append(ids[i])
            r["logprobs"].append(values[i])
            r["timestamp"].append(now)
        for i in verified:
            self.verified["position"].append(pos0 + i)
            self.verified["ids"].append(ids[i])
            self.verified["logprobs"].append(values[i])

    def add_verified(self, positions: list[int], target_logits: torch.Tensor) -> None:
        """Verifier distributions with no draft: row i of target_logits [R, V] scored the token
        after position positions[i] (the prompt positions a prefill kept)."""
        values, ids = self._topk(torch.log_softmax(target_logits.float(), dim=-1))
        for i, position in enumerate(positions):
            self.verified["position"].append(position)
            self.verified["ids"].append(ids[i])
            self.verified["logprobs"].append(values[i])

    def _topk(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, ids) [R, K] of rows of log-probs [R, V]: the top `topk`, or all V in id order."""
        if self.topk and self.topk < logp.shape[-1]:
            return torch.topk(logp, self.topk, dim=-1)
        return logp, torch.arange(logp.shape[-1]).expand_as(logp)

    def build(self, request_id, version, exit_layer, temperature, hidden: torch.Tensor, tokens: list[int],
              prompt_length: int, vocab: int) -> Trajectory:
        r, v = self.rows, self.verified
        k = self.topk if self.topk and self.topk < vocab else vocab

        def stack(xs, dtype):
            return torch.stack(xs).to(dtype) if xs else torch.empty(0, k, dtype=dtype)

        return Trajectory(
            request_id=request_id,
            weight_version=int(version),
            exit_layer=int(exit_layer),
            temperature=float(temperature),
            created_at=time.time(),
            prompt_length=int(prompt_length),
            hidden=hidden.to(torch.float16).contiguous(),
            tokens=torch.tensor(tokens, dtype=torch.int64),
            position=torch.tensor(r["position"], dtype=torch.int64),
            block_index=torch.tensor(r["block_index"], dtype=torch.int64),
            token=torch.tensor(r["token"], dtype=torch.int64),
            target_token=torch.tensor(r["target_token"], dtype=torch.int64),
            accepted=torch.tensor(r["accepted"], dtype=torch.bool),
            drafter_logprob=torch.tensor(r["drafter_logprob"], dtype=torch.float32),
            verifier_topk_ids=stack(r["ids"], torch.int64),
            verifier_topk_logprobs=stack(r["logprobs"], torch.float32),
            timestamp=torch.tensor(r["timestamp"], dtype=torch.float64),
            verified_position=torch.tensor(v["position"], dtype=torch.int64),
            verified_topk_ids=stack(v["ids"], torch.int64),
            verified_topk_logprobs=stack(v["logprobs"], torch.float32),
        )


@dataclass
class DecodeState:
    """Everything one in-flight request owns between blocks.

    tokens: prompt + committed tokens; cache: base KV cache holding positions [0, len(tokens) - 1);
    exit_cache: the exit head's KV cache (may lag, see module docstring); hk_committed: [1, 1, H]
    layer-k states of positions [0, len(tokens) - 1); budget: tokens still allowed; context: the
    n-gram index of `tokens` for context drafting (None when it is off); draft_stats: this
    request's running exit-head acceptance for adaptive gamma (per request, so a seeded request
    decodes the same whatever was served before it); context_stats: its running acceptance of
    context drafts per match length, for the draft-source choice (common/core/arbitration.py).
    """

    config: DecodeConfig
    tokens: list[int]
    cache: object
    exit_cache: object
    hk_committed: list[torch.Tensor]
    budget: int
    result: GenerationResult
    generator: torch.Generator | None
    request_id: str
    recorder: TrajectoryRecorder | None
    started: float
    context: ContextIndex | None = None
    draft_stats: DraftStats = field(default_factory=DraftStats)
    context_stats: ContextStats = field(default_factory=ContextStats)

    @property
    def done(self) -> bool:
        return self.budget <= 0 or self.result.finished_by_eos


BATCH_ROWS = 8
"""Requests `SpeculativeDecoder.generate_batch` advances per pass: the q8 kernel reads each weight
once per 8 rows (common/model/engine/gguf_kernels.py, Q8_ROWS)."""


class SpeculativeDecoder:
    """Plain (non-Ray) generator over a SplitModel, batch size 1.

    `generate` serves one request; `start` / `step` / `finish` expose the same loop one block at a
    time (the service swaps adapter weights only between requests, never inside one).
    `gamma_policy`, when given, is called before each block with the result so far and the
    config's gamma, and returns the gamma for that block (adaptive drafting, AR fall-back).
    `traffic` is the n-gram index of the requests this decoder has served (a fresh one unless
    given): requests with `DecodeConfig.traffic_drafting` (and context drafting) feed it when they
    finish, and greedy ones draft from it (common/core/traffic_draft.py). A decoder serves one
    request at a time.
    """

    def __init__(self, split: SplitModel, gamma_policy: Callable[[GenerationResult, int], int] | None = None,
                 traffic: TrafficIndex | None = None):
        self.split = split
        self.gamma_policy = gamma_policy
        self.traffic = TrafficIndex() if traffic is None else traffic

    def check_request(self, prompt_ids: list[int], config: DecodeConfig) -> None:
        """RequestRejected (a ValueError) for an empty prompt, one that cannot fit max_new_tokens in
        the context, or one holding token ids outside the vocabulary."""
        fit_to_context(prompt_ids, config.max_new_tokens, self.split.max_positions, truncate=False)
        bad = [t for t in prompt_ids if not 0 <= t < self.split.vocab_size]
        if bad:
            raise RequestRejected(f"prompt holds token ids outside the vocabulary: {bad[:5]}")

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        config: DecodeConfig,
        *,
        generator: torch.Generator | None = None,
        request_id: str | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Decode up to `config.max_new_tokens` tokens after `prompt_ids`.

        Greedy (temperature 0): the tokens equal the model's own greedy decoding. Temperature > 0:
        they are distributed as the model's own sampling (with the same top-k/top-p). Randomness
        comes only from `generator`. `on_tokens` is called with each block's committed tokens.
        """
        state = self.start(prompt_ids, config, generator=generator, request_id=request_id)
        while not state.done:
            committed = self.step(state)
            if on_tokens is not None:
                on_tokens(committed)
        return self.finish(state)

    @torch.inference_mode()
    def generate_batch(
        self,
        prompts: list[list[int]],
        config: DecodeConfig,
        *,
        generators: list[torch.Generator | None] | None = None,
        request_ids: list[str] | None = None,
        rows: int = BATCH_ROWS,
    ) -> list[GenerationResult]:
        """Decode many requests together without drafting: one verifier pass advances up to `rows`
        of them by one token each (a finished request's place goes to the next one waiting).

        For text, not latency (a warm-start corpus): on a CPU one pass over the weights costs
        about the same for a few rows as for one, whichever sequences the rows belong to. Each
        request is decoded as `generate` decodes it alone with the same `config` and generator:
        the same prefill, tokens, Trajectory and counts (on the q8 kernel bit for bit; tests/
        integration/test_batch_decoding.py). `config` must draft nothing (gamma 0, context_tokens
        0). Returns one result per prompt, in order."""
        if config.gamma or config.context_tokens:
            raise ValueError("generate_batch does not draft: it needs gamma 0 and context_tokens 0")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        count = len(prompts)
        generators = [None] * count if generators is None else generators
        request_ids = [None] * count if request_ids is None else request_ids
        if len(generators) != count or len(request_ids) != count:
            raise ValueError("generate_batch needs one generator and one request id per prompt")
        for prompt in prompts:
            self.check_request(prompt, config)
        results: list[GenerationResult | None] = [None] * count
        waiting = list(range(count))[::-1]
        active: list[tuple[int, DecodeState]] = []
        while waiting or active:
            while waiting and len(active) < rows:
                i = waiting.pop()
                active.append((i, self.start(prompts[i], config, generator=generators[i], request_id=request_ids[i])))
            h_k, logits = self.split.step_sequences([state.tokens[-1] for _, state in active],
                                                    [state.cache for _, state in active])
            for b, (_, state) in enumerate(active):
                self._accept_and_commit(state, len(state.tokens) - 1, [], [], [], False, 0, h_k[b:b + 1][None],
                                        logits[b:b + 1])
            for i, state in [pair for pair in active if pair[1].done]:
                results[i] = self.finish(state)
            active = [pair for pair in active if not pair[1].done]
        return results  # type: ignore[return-value]  # every slot is filled above

    @torch.inference_mode()
    def start(
        self,
        prompt_ids: list[int],
        config: DecodeConfig,
        *,
        generator: torch.Generator | None = None,
        request_id: str | None = None,
    ) -> DecodeState:
        """Validate the request and prefill every prompt token but the last (the cache invariant)."""
        self.check_request(prompt_ids, config)
        split = self.split
        capacity = len(prompt_ids) + config.max_new_tokens + config.gamma + 1
        state = DecodeState(
            config=config,
            tokens=list(prompt_ids),
            cache=split.new_cache(capacity),
            exit_cache=split.new_exit_cache(capacity),
            hk_committed=[],
            budget=config.max_new_tokens,
            result=GenerationResult(prompt_ids=list(prompt_ids), weight_version=split.weight_version),
            generator=generator,
            request_id=request_id or uuid.uuid4().hex,
            recorder=TrajectoryRecorder(config.record_topk) if config.record_trajectories else None,
            started=time.perf_counter(),
            context=ContextIndex(prompt_ids, config.context_ngram, config.context_min_ngram,
                                 self.traffic if config.traffic_drafting and config.greedy else None)
            if config.context_tokens else None,
        )
        if len(prompt_ids) > 1:
            ids = torch.tensor([prompt_ids[:-1]], device=split.device)
            pos = torch.arange(len(prompt_ids) - 1, device=split.device)[None]
            h = split.shallow(ids, pos, state.cache)
            scored = prompt_positions(len(prompt_ids) - 1, config.record_prompt_positions if state.recorder else 0)
            if scored.numel():
                state.recorder.add_verified(scored.tolist(), split.deep(h, pos, state.cache, logits=scored)[0])
            else:
                split.deep(h, pos, state.cache, logits=False)
            state.hk_committed.extend(h.split(1, dim=1))
        return state

    @torch.inference_mode()
    def step(self, state: DecodeState) -> list[int]:
        """Run one draft-verify block; return the tokens it committed (1 to gamma + 1)."""
        assert not state.done, "step() on a finished request"
        split = self.split
        device = split.device
        pos0 = len(state.tokens) - 1  # position of the block's first input, the last committed token
        block_states: list[torch.Tensor] = []  # layer-k states of positions pos0 .. pos0 + len(drafts)
        room = state.budget - 1  # never draft past the budget
        drafts, draft_probs, draft_logprobs, from_context, ngram = self._draft(state, block_states, room)
        g = len(drafts)
        verify_pos = torch.arange(pos0, pos0 + g + 1, device=device)[None]
        states = torch.cat(block_states, dim=1)  # [1, g + 1, H]
        target_logits = split.deep(states, verify_pos, state.cache)[0]  # [g + 1, V]
        return self._accept_and_commit(state, pos0, drafts, draft_probs, draft_logprobs, from_context, ngram, states,
                                       target_logits)

    def _accept_and_commit(self, state: DecodeState, pos0: int, drafts: list[int], draft_probs: list[torch.Tensor],
                           draft_logprobs: list[float], from_context: bool, ngram: int, states: torch.Tensor,
                           target_logits: torch.Tensor) -> list[int]:
        """A verified block's acceptance and bookkeeping: `states` [1, g + 1, H] are the layer-k
        states of positions pos0 .. pos0 + g and `target_logits` [g + 1, V] the verifier's logits
        there. Accepts (greedy prefix match or rejection sampling with the request's generator),
        crops the caches, records, and returns the committed tokens."""
        split, config, result = self.split, state.config, state.result
        g = len(drafts)
        draft_tensor = torch.tensor(drafts, dtype=torch.int64, device=target_logits.device)
        if config.greedy:
            n_accepted, next_token = greedy_accept(draft_tensor, target_logits)
        else:
            target_probs = warp(target_logits, config.temperature, config.top_k, config.top_p)
            q_stack = torch.stack(draft_probs) if g else target_probs[:0]
            n_accepted, next_token = rejection_accept(draft_tensor, q_stack, target_probs, state.generator)

        result.verifier_passes += 1
        if from_context:
            result.context_drafted += g
            result.context_accepted += n_accepted
            if ngram < 0:  # drafted from the traffic index (ContextIndex.propose)
                result.traffic_drafted += g
                result.traffic_accepted += n_accepted
            state.context_stats.observe_block(ngram, g, n_accepted)
        else:
            result.drafted += g
            result.accepted += n_accepted
            state.draft_stats.observe_block(g, n_accepted)
            _bump(result.drafted_by_position, range(g))
            _bump(result.accepted_by_position, range(n_accepted))

        crop_cache(state.cache, pos0 + n_accepted + 1)
        crop_cache(state.exit_cache, pos0 + n_accepted + 1)
        committed = (drafts[:n_accepted] + [next_token])[: state.budget]
        for j, t in enumerate(committed):
            if t in split.eos_token_ids:
                committed = committed[: j + 1]
                result.finished_by_eos = True
                break
        if state.recorder is not None:
            state.recorder.add_block(
                pos0, drafts, draft_logprobs, n_accepted, next_token, target_logits, len(committed), not from_context
            )
        # the states of the committed tokens' inputs: positions pos0 .. pos0 + len(committed) - 1
        state.hk_committed.extend(states[:, : len(committed)].split(1, dim=1))
        state.tokens.extend(committed)
        if state.context is not None:
            state.context.extend(committed)
        result.token_ids.extend(committed)
        state.budget -= len(committed)
        return committed

    def _draft(self, state: DecodeState, block_states: list[torch.Tensor], room: int):
        """The block's draft, from the context or the exit head (`common.core.arbitration`; with
        `arbitrate` off, any context match wins). Fills `block_states` (empty on entry) with the
        layer-k states of the block's input and its drafted tokens. With a context match (and
        `DecodeConfig.shared_shallow_pass`), the input and the context's tokens run through the
        shallow layers in one pass (one read of their weights, as the verify pass reads the deep
        ones), so a context draft costs its verify rows alone and a probe of the head reads the
        input's state from that pass; a block the head then drafts drops the context's rows from
        the cache. Returns (tokens, q rows (sampling only), log q of each head-drafted token,
        from_context, the context match's n-gram length)."""
        split, config = self.split, state.config
        pos0, device = len(state.tokens) - 1, split.device
        draft_cost, row_cost, probe_cost = split.costs(len(state.tokens))  # at this sequence's length
        context, ngram = state.context.propose(min(config.context_tokens, room)) if state.context is not None else ([], 0)
        shared = bool(context) and config.shared_shallow_pass
        # what the context's draft adds besides its verify rows, and what a probe of the head costs
        context_cost, probe_cost = (0.0, probe_cost) if shared else (draft_cost, draft_cost)
        if context and config.adaptive_gamma:  # as long as pays, given what a verify row costs
            context = context[: best_context_length(len(context), state.context_stats.estimate(ngram), context_cost, row_cost)]
        inputs = state.tokens[-1:] + (context if shared else [])
        rows = split.shallow(torch.tensor([inputs], device=device),
                             torch.arange(pos0, pos0 + len(inputs), device=device)[None], state.cache)
        block_states.append(rows[:, :1])
        first_logits, use_head = None, not context
        if context and config.arbitrate and config.gamma > 0:
            first_logits, use_head = self._arbitrate(state, block_states, len(context), ngram, room,
                                                     (draft_cost, row_cost, probe_cost, context_cost))
        if use_head:
            gamma = config.gamma if self.gamma_policy is None else self.gamma_policy(state.result, config.gamma)
            gamma = max(0, min(gamma, room))
            if config.adaptive_gamma:
                gamma = state.draft_stats.gamma(gamma, draft_cost, row_cost)
            if gamma > 0 or not context:
                if context:
                    state.result.head_over_context += 1
                if shared:
                    crop_cache(state.cache, pos0 + 1)  # the context's rows leave the shallow layers' cache
                return (*self._draft_from_head(state, block_states, gamma, first_logits), False, 0)
        if shared:
            block_states.append(rows[:, 1:])
        else:  # every drafted token's layer-k state in one batched shallow pass of its own
            at = torch.arange(pos0 + 1, pos0 + 1 + len(context), device=device)[None]
            block_states.append(split.shallow(torch.tensor([context], device=device), at, state.cache))
        draft_probs = [] if config.greedy else [_one_hot(t, split.vocab_size, device) for t in context]
        return context, draft_probs, [], True, ngram

    def _arbitrate(self, state: DecodeState, block_states: list[torch.Tensor], context_tokens: int, ngram: int,
                   room: int, costs: tuple[float, float, float, float]) -> tuple[torch.Tensor | None, bool]:
        """Context or exit head for a block the context can draft: (the head's first-step logits
        when they were computed, True for the head). The head's confidence is measured (the exit
        head on the block input's state, `block_states[0]`; reused if the head wins) only when its
        best case could beat the context. costs: the block's (draft step, verify row, probe,
        context draft) costs (`SplitModel.costs`, and `_draft`'s context and probe costs)."""
        config, stats = state.config, state.draft_stats
        cost, row_cost, probe_cost, context_cost = costs
        gamma = min(config.gamma, room)
        if config.adaptive_gamma:
            gamma = stats.gamma(gamma, cost, row_cost)
        head_acceptance = stats.prior if stats.acceptance is None else stats.acceptance
        args = (context_tokens, state.context_stats.estimate(ngram), gamma, head_acceptance)
        if choose_draft_source(*args, None, cost, config.confidence_threshold, row_cost, context_cost=context_cost) == CONTEXT:
            return None, False
        context_stats = state.context_stats
        if not (worth_probing(*args, cost, row_cost, context_stats.win_rate, context_cost=context_cost,
                              probe_cost=probe_cost) or context_stats.probe_due()):
            context_stats.observe_probe(False)
            return None, False
        first = self._head_logits(state, block_states, 0)
        confidence = _confidence(first, config)
        head = choose_draft_source(*args, confidence, cost, config.confidence_threshold, row_cost,
                                   context_cost=context_cost) == HEAD
        context_stats.observe_probe(True, head)
        return first, head

    def _head_logits(self, state: DecodeState, block_states: list[torch.Tensor], i: int) -> torch.Tensor:
        """The exit head's logits [V'] (draft vocabulary) for block position i: feeds it every
        layer-k state it has not seen yet (its cache may lag, see the module docstring)."""
        pos0, device = len(state.tokens) - 1, self.split.device
        exit_len = state.exit_cache.get_seq_length(0)
        unseen = state.hk_committed[exit_len:] + block_states[max(0, exit_len - pos0):]
        unseen_pos = torch.arange(exit_len, pos0 + i + 1, device=device)[None]
        return self.split.draft(torch.cat(unseen, dim=1) if len(unseen) > 1 else unseen[0], unseen_pos, state.exit_cache)

    def _draft_from_head(self, state: DecodeState, block_states: list[torch.Tensor], gamma: int,
                         first_logits: torch.Tensor | None = None):
        """Draft up to `gamma` tokens with the exit head, one at a time, each drafted token also
        run through the shallow layers (its state appended to `block_states`). Drafting stops
        early when the drafter's top-1 probability falls below the confidence threshold.
        first_logits: the first step's logits when `_arbitrate` already computed them.
        Returns (tokens, q rows over the full vocabulary (sampling only), log q of each token)."""
        split, config, device = self.split, state.config, self.split.device
        pos0 = len(state.tokens) - 1
        vocab = split.draft_vocab
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []
        draft_logprobs: list[float] = []
        for i in range(gamma):
            q_logits = first_logits if i == 0 and first_logits is not None else self._head_logits(state, block_states, i)
            if config.greedy:  # [V'] over the draft vocabulary
                logq = torch.log_softmax(q_logits, -1)
                index = int(logq.argmax())
                logprob = float(logq[index])
                confidence = math.exp(logprob)
            else:
                q_draft = warp(q_logits, config.temperature, config.top_k, config.top_p)
                index = sample(q_draft, state.generator)
                logprob = float(torch.log(q_draft[index].clamp_min(1e-30)))
                confidence = float(q_draft.max())
            if confidence < config.confidence_threshold:
                break
            token = int(vocab[index])
            drafts.append(token)
            draft_logprobs.append(logprob)
            if not config.greedy:  # q is 0 outside the draft vocabulary: still a proposal distribution
                draft_probs.append(q_draft.new_zeros(split.vocab_size).index_copy_(0, vocab, q_draft))
            block_states.append(
                split.shallow(torch.tensor([[token]], device=device), torch.tensor([[pos0 + i + 1]], device=device), state.cache)
            )
        return drafts, draft_probs, draft_logprobs

    def finish(self, state: DecodeState) -> GenerationResult:
        """Close the request: timing, the traffic index fed with its tokens, and, when recording,
        the learner's Trajectory."""
        split, result = self.split, state.result
        if state.context is not None and state.config.traffic_drafting:
            self.traffic.add(state.tokens)
        result.seconds = time.perf_counter() - state.started
        if state.recorder is not None:
            hidden = torch.cat(state.hk_committed, dim=1)[0] if state.hk_committed else torch.zeros(0, split.hidden_size)
            result.trajectory = state.recorder.build(
                state.request_id, result.weight_version, split.exit_layer, state.config.temperature, hidden,
                state.tokens, len(result.prompt_ids), split.vocab_size,
            )
        return result


def _confidence(q_logits: torch.Tensor, config: DecodeConfig) -> float:
    """The exit head's top-1 probability for one step, as its confidence stop sees it."""
    if config.greedy:
        return float(torch.softmax(q_logits.float(), -1).max())
    return float(warp(q_logits, config.temperature, config.top_k, config.top_p).max())


def prompt_positions(length: int, most: int) -> torch.Tensor:
    """[R] int64 ascending positions of a prefill of `length` rows whose verifier targets are
    recorded: all of them when `most` >= length, else `most` spread evenly with the last one in."""
    if most <= 0 or length <= 0:
        return torch.empty(0, dtype=torch.int64)
    if most >= length:
        return torch.arange(length)
    return torch.unique(torch.linspace(length - 1, 0, most).round().to(torch.int64))


def _one_hot(token: int, vocab_size: int, device) -> torch.Tensor:
    """A proposal that puts all its mass on `token` (a context draft, at temperature > 0)."""
    q = torch.zeros(vocab_size, device=device)
    q[token] = 1.0
    return q


def _bump(counts: list[int], positions) -> None:
    for i in positions:
        while len(counts) <= i:
            counts.append(0)
        counts[i] += 1
