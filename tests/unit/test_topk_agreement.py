"""benchmarks/topk_agreement.py: top-k hits split by whether context drafting matches."""

import torch

from tests.helpers import load_benchmark

probe = load_benchmark("topk_agreement")


def test_topk_hits_by_position_kind():
    # tokens 5 6 5 7 8: scored positions 1..3 (start 1); after [5, 6] no suffix occurred before,
    # after [5, 6, 5] the unigram 5 did (followed by 6), after [5, 6, 5, 7] nothing (7 is new)
    tokens = [5, 6, 5, 7, 8]
    top1 = torch.tensor([-1, 5, 7, 8])
    top = torch.zeros(4, 8, dtype=torch.int64)
    top[1, :2] = torch.tensor([9, 5])  # verifier's 5 is the head's second choice
    top[2, 0] = 7  # first choice
    top[3, 7] = 8  # eighth choice
    counts, hits = probe.topk_hits(tokens, 1, top1, top, max_ngram=3, min_ngram=1)
    assert counts == {"all": 3, "context_match": 1, "no_context_match": 2}
    assert hits["context_match"] == {1: 1, 2: 1, 4: 1, 8: 1}
    assert hits["no_context_match"] == {1: 0, 2: 1, 4: 1, 8: 2}
    assert hits["all"] == {1: 1, 2: 2, 4: 2, 8: 3}
