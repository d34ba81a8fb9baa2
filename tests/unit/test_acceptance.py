"""Acceptance rules: exact greedy cases, seeded repeatability, and convergence to p."""

import torch
from scipy.stats import chisquare

from common.core.acceptance import greedy_accept, rejection_accept
from common.core.sampling import warp


def _onehot_logits(tokens, vocab=6):
    logits = torch.full((len(tokens), vocab), -5.0)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_perfect_match_takes_bonus_token():
    # verifier argmax per row: 3, 1, 4, 0 ; draft 3, 1, 4 -> all 3 accepted, bonus = row 3's argmax = 0
    assert greedy_accept(torch.tensor([3, 1, 4]), _onehot_logits([3, 1, 4, 0])) == (3, 0)


def test_greedy_early_mismatch_commits_the_verifier_token():
    # draft 3, 2, 4 vs argmax 3, 1, 4, 0: first mismatch at index 1 -> 1 accepted, correction = 1
    assert greedy_accept(torch.tensor([3, 2, 4]), _onehot_logits([3, 1, 4, 0])) == (1, 1)


def test_greedy_mismatch_at_first_token_and_match_after_is_not_accepted():
    assert greedy_accept(torch.tensor([5, 1]), _onehot_logits([3, 1, 2])) == (0, 3)


def test_greedy_empty_draft_is_one_ar_step():
    assert greedy_accept(torch.empty(0, dtype=torch.int64), _onehot_logits([2])) == (0, 2)


def test_greedy_ties_go_to_lowest_id_like_hf():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert greedy_accept(torch.empty(0, dtype=torch.int64), logits) == (0, 1)


def test_rejection_sampling_is_reproducible_with_a_seed():
    p = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), -1)
    q = torch.softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(2)), -1)
    draft = torch.tensor([0, 1, 2])
    a = [rejection_accept(draft, q, p, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_rejection_identical_p_and_q_accepts_everything():
    p = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(3)), -1)
    # q == p on the drafted rows: min(1, p/q) = 1, always accepted
    n, _ = rejection_accept(torch.tensor([1, 4]), p[:2].clone(), p, torch.Generator().manual_seed(0))
    assert n == 2


def test_rejection_never_accepts_a_token_p_forbids():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    # draft token 0 has p = 0: rejected; the residual max(0, p - q) = [0, 1, 0] gives token 1
    assert rejection_accept(torch.tensor([0]), q, p, torch.Generator().manual_seed(0)) == (0, 1)


def test_first_committed_token_follows_p_whatever_q():
    """Statistical: over many draws the first committed token is distributed as p_0, not q_0."""
    vocab, trials = 5, 20000
    p = torch.tensor([[0.05, 0.4, 0.25, 0.2, 0.1], [0.2] * 5])
    q = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(123)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        draft = torch.multinomial(q[0], 1, generator=gen)
        n, nxt = rejection_accept(draft, q, p, gen)
        counts[int(draft) if n == 1 else nxt] += 1
    stat = chisquare(counts.numpy(), (p[0] * trials).numpy())
    assert stat.pvalue > 1e-3, (counts / trials, p[0])
    # and the same test rejects a wrong target, so it can fail
    wrong = chisquare(counts.numpy(), (q[0] * trials).numpy())
    assert wrong.pvalue < 1e-6


def test_warp_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(warp(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    # top-2 keeps 0.5, 0.3 renormalised to 0.625, 0.375
    assert torch.allclose(warp(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    # top-p 0.7: mass before token 1 is 0.5 < 0.7 (kept), before token 2 is 0.8 >= 0.7 (dropped)
    assert torch.allclose(warp(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    # temperature 0.5 squares and renormalises: 0.25, 0.09, 0.0225, 0.0025 / 0.365
    expected = torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365
    assert torch.allclose(warp(logits, 0.5), expected, atol=1e-5)
