"""Context drafting proposes the continuation of the most recent earlier occurrence of the suffix."""

import random

import pytest

from common.core.context_draft import ContextIndex


def brute_force(tokens, max_tokens, max_ngram, min_ngram):
    for n in range(min(max_ngram, len(tokens)), min_ngram - 1, -1):
        suffix = tokens[len(tokens) - n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # most recent first, continuation known
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + max_tokens], n
    return [], 0


def test_continues_the_most_recent_occurrence_of_the_longest_suffix():
    index = ContextIndex([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], max_ngram=3)
    # suffix (2, 3) last occurred at 5..6, followed by 7, 5, 2, 3 (the 3-gram (5, 2, 3) never did)
    assert index.propose(3) == ([7, 5, 2], 2)
    index.extend([7])
    assert index.propose(10) == ([5, 2, 3, 7], 3)  # (2, 3, 7) occurred at 5..7


def test_no_match_and_zero_budget():
    index = ContextIndex([1, 2, 3], max_ngram=2)
    assert index.propose(5) == ([], 0)
    assert ContextIndex([4, 4, 4]).propose(0) == ([], 0)


def test_min_ngram_rejects_short_matches():
    tokens = [5, 1, 8, 9, 1]
    assert ContextIndex(tokens, max_ngram=3, min_ngram=1).propose(2) == ([8, 9], 1)
    assert ContextIndex(tokens, max_ngram=3, min_ngram=2).propose(2) == ([], 0)
    with pytest.raises(ValueError):
        ContextIndex(tokens, max_ngram=2, min_ngram=3)


@pytest.mark.parametrize("seed", range(20))
def test_incremental_index_equals_brute_force(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 8))]
    index = ContextIndex(tokens, max_ngram=3, min_ngram=1)
    for _ in range(40):
        assert index.propose(4) == brute_force(tokens, 4, 3, 1)
        new = [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
        tokens += new
        index.extend(new)
