"""Builders of valid test data shared by unit, integration and service tests."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import torch

from common.core.types import Trajectory


def make_trajectory(
    n_drafted: int = 8,
    n_context: int | None = None,
    hidden: int = 16,
    k: int = 4,
    *,
    seed: int = 0,
    gamma: int = 4,
    vocab: int = 100,
    weight_version: int = 0,
    exit_layer: int = 2,
    temperature: float = 0.0,
    request_id: str | None = None,
    created_at: float = 1_700_000_000.0,
    n_verified: int = 0,
) -> Trajectory:
    """A valid, seeded random `Trajectory` with the block structure speculative decoding produces.

    Args:
      n_drafted: N, recorded drafted tokens (0 allowed).
      n_context: T, rows of `hidden`; None picks a 4-token prompt plus the span the blocks need.
        Raises ValueError if the given T cannot hold the drafted positions.
      hidden: H, hidden size of the float16 `hidden` states (standard normal values).
      k: K, verifier top-k log-probs kept per token (must be <= vocab).
      seed: everything random comes from one `torch.Generator` seeded with this.
      gamma: most tokens drafted per block.
      vocab: token ids are drawn from [0, vocab).
      weight_version, exit_layer, temperature, request_id, created_at: the scalars (request_id
        defaults to f"req-{seed}").
      n_verified: M, extra verified positions (the first committed positions no draft covers).

    Structure: each block drafts up to `gamma` tokens from consecutive positions; its records are
    a run of accepted tokens followed, unless all were accepted, by exactly one rejected token
    whose `target_token` differs from `token`. The next block starts after the committed prefix
    plus the bonus/correction token, so `position` is non-decreasing. The last block may be cut.
    """
    if n_drafted < 0 or hidden < 1 or k < 1 or gamma < 1 or vocab < 2 or k > vocab:
        raise ValueError(
            f"bad sizes: n_drafted={n_drafted} hidden={hidden} k={k} gamma={gamma} vocab={vocab}"
        )
    g = torch.Generator().manual_seed(seed)
    prompt = 4
    positions: list[int] = []
    block_index: list[int] = []
    accepted: list[bool] = []
    start = prompt - 1  # the last prompt state drafts the first token
    while len(positions) < n_drafted:
        drafted = int(torch.randint(1, gamma + 1, (1,), generator=g))
        n_accepted = int(torch.randint(0, drafted + 1, (1,), generator=g))
        n_records = n_accepted + (1 if n_accepted < drafted else 0)
        for j in range(min(n_records, n_drafted - len(positions))):
            positions.append(start + j)
            block_index.append(j)
            accepted.append(j < n_accepted)
        start += n_accepted + 1  # accepted prefix + bonus (or correction) token committed
    needed = (positions[-1] + 1) if positions else prompt
    if n_context is None:
        n_context = needed + n_verified  # room after the drafted span for the verified positions
    elif n_context < needed:
        raise ValueError(f"n_context={n_context} cannot hold drafted positions up to {needed - 1}")

    n = n_drafted
    accepted_t = torch.tensor(accepted, dtype=torch.bool)
    token = torch.randint(0, vocab, (n,), generator=g)
    # a rejected token's correction differs from the drafted token
    shift = torch.randint(1, vocab, (n,), generator=g)
    target_token = torch.where(accepted_t, token, (token + shift) % vocab)
    topk_ids = (
        torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
        if n
        else (torch.zeros(0, k, dtype=torch.int64))
    )
    topk_logprobs = -torch.rand(n, k, generator=g).sort(dim=1).values * 10.0
    prompt_length = min(prompt, n_context + 1)
    tokens = torch.randint(0, vocab, (n_context + 1,), generator=g)
    tokens[torch.tensor(positions, dtype=torch.int64) + 1] = target_token
    free = [p for p in range(prompt_length - 1, n_context) if p not in set(positions)]
    if n_verified > len(free):
        raise ValueError(f"n_context={n_context} leaves only {len(free)} positions for n_verified={n_verified}")
    verified_ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n_verified)]) if n_verified else torch.zeros(0, k, dtype=torch.int64)
    return Trajectory(
        request_id=request_id if request_id is not None else f"req-{seed}",
        weight_version=weight_version,
        exit_layer=exit_layer,
        temperature=float(temperature),
        created_at=float(created_at),
        prompt_length=prompt_length,
        hidden=torch.randn(n_context, hidden, generator=g).to(torch.float16),
        tokens=tokens,
        position=torch.tensor(positions, dtype=torch.int64),
        block_index=torch.tensor(block_index, dtype=torch.int64),
        token=token,
        target_token=target_token,
        accepted=accepted_t,
        drafter_logprob=-torch.rand(n, generator=g) * 5.0,
        verifier_topk_ids=topk_ids,
        verifier_topk_logprobs=topk_logprobs.float(),
        timestamp=created_at - 1.0 + torch.arange(n, dtype=torch.float64) * 1e-3,
        verified_position=torch.tensor(free[:n_verified], dtype=torch.int64),
        verified_topk_ids=verified_ids,
        verified_topk_logprobs=(-torch.rand(n_verified, k, generator=g).sort(dim=1).values * 10.0).float(),
    ).validate()


def assert_trajectories_equal(a: Trajectory, b: Trajectory) -> None:
    """Assert every scalar is equal and every tensor bit-identical (NaN and -0.0 included)."""
    assert a.scalars() == b.scalars()
    for name, left in a.tensors().items():
        right = getattr(b, name)
        assert left.dtype == right.dtype and left.shape == right.shape, name
        assert left.contiguous().numpy().tobytes() == right.contiguous().numpy().tobytes(), name


def head_only(**kwargs):
    """A DecodeConfig that drafts with the exit head alone, every block, up to gamma tokens: no
    context drafting, no confidence stop, no adaptive gamma (tests of the exit-head paths)."""
    from common.core.config import DecodeConfig

    return DecodeConfig(**{"context_tokens": 0, "confidence_threshold": 0.0, "adaptive_gamma": False, **kwargs})


def sample_two_tokens(decoder, prompt: list[int], config, trials: int, seed: int = 0):
    """Decode `trials` two-token samples of `prompt` with one seeded generator.

    Returns (counts {(t1, t2): n} over every pair of the vocabulary, the GenerationResults)."""
    import itertools

    vocab = decoder.split.vocab_size
    gen = torch.Generator().manual_seed(seed)
    counts = dict.fromkeys(itertools.product(range(vocab), repeat=2), 0)
    results = []
    for _ in range(trials):
        result = decoder.generate(prompt, config, generator=gen)
        counts[tuple(result.token_ids)] += 1
        results.append(result)
    return counts, results


def matches_model_distribution(model, prompt: list[int], counts: dict) -> float:
    """Chi-square p-value of two-token sample `counts` against p(t1, t2 | prompt) computed from
    `model` itself (every pair of its vocabulary)."""
    import numpy as np
    from scipy.stats import chisquare

    cells = sorted(counts)
    vocab = max(a for a, _ in cells) + 1
    with torch.no_grad():
        p1 = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
        p2 = [torch.softmax(model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1].float(), -1) for a in range(vocab)]
    observed = np.array([counts[c] for c in cells], dtype=np.float64)
    expected = np.array([float(p1[a] * p2[a][b]) for a, b in cells], dtype=np.float64)
    expected *= observed.sum() / expected.sum()  # chisquare wants equal totals to ~1e-8
    return float(chisquare(observed, expected).pvalue)


@functools.cache
def stories_with_references(exit_layer: int, texts: tuple[str, ...], max_new_tokens: int,
                            exit_init_layer: int | None = None):
    """(stories260K split at `exit_layer`, prompt ids, the frozen model's greedy continuations,
    the untrained adapter state): built once per argument set, for tests that check every answer
    token for token. Reset the split with `split.load_adapter_state(untrained, 0)` between tests."""
    from tests.tiny_models import stories_split

    split = stories_split(exit_layer, exit_init_layer=exit_init_layer)
    prompts, references = greedy_references(split, list(texts), max_new_tokens)
    return split, prompts, references, split.adapter_state()


def greedy_references(split, texts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, the frozen model's own greedy continuation) for each text, decoded by Hugging
    Face `generate`: what a lossless decoder must reproduce token for token."""
    prompts = [split.tokenizer(text)["input_ids"] for text in texts]
    references = []
    for ids in prompts:
        out = split.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=split.model.generation_config.eos_token_id, pad_token_id=0)
        references.append(out[0, len(ids):].tolist())
    return prompts, references


def run_watcher(generator, seconds: float, poll_s: float = 0.5) -> None:
    """Run `generator.watch` (the actor's weight-watcher loop) on a thread for `seconds`, then stop it."""
    import threading
    import time

    stop = threading.Event()
    watcher = threading.Thread(target=generator.watch, args=(stop, poll_s))
    watcher.start()
    time.sleep(seconds)
    stop.set()
    watcher.join(timeout=5)


def load_benchmark(name: str):
    """The module of benchmarks/<name>.py (the benchmarks are scripts, not a package), loaded once and
    registered in sys.modules under `name`, where its dataclasses look their module up."""
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
