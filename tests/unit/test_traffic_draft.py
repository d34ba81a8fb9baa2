"""The traffic index drafts what most often followed the suffix in earlier requests, within its memory bound."""

import random
from collections import Counter

import pytest

from common.core.config import TrafficConfig
from common.core.context_draft import ContextIndex
from common.core.traffic_draft import TrafficIndex


def brute_force_next(sequences, context, config):
    """next_token from scratch: every occurrence of the longest known suffix, in the order added."""
    for n in range(min(config.max_ngram, len(context)), config.min_ngram - 1, -1):
        suffix = tuple(context[len(context) - n:])
        followers = [seq[p] for seq in sequences for p in range(n, len(seq)) if tuple(seq[p - n:p]) == suffix]
        if followers:
            counts = Counter(followers)
            top = max(counts.values())
            # the token that reached the top count first
            seen, token = Counter(), None
            for t in followers:
                seen[t] += 1
                if seen[t] == top and counts[t] == top:
                    token = t
                    break
            confident = top >= config.min_count and top >= config.share * len(followers)
            return (token if confident else None), n
    return None, 0


def test_drafts_the_confident_continuation_of_the_longest_known_suffix():
    index = TrafficIndex(TrafficConfig(max_ngram=3, min_ngram=2, share=0.5, min_count=2))
    index.add([1, 2, 3, 4, 5])
    assert index.propose([9, 1, 2], 3) == ([], 2)  # (1, 2) -> 3 seen once: below min_count
    index.add([7, 1, 2, 3, 4, 6])
    # (1, 2) -> 3 twice; then (1, 2, 3) -> 4 twice; then (2, 3, 4) -> 5 once, 6 once: stops there
    assert index.propose([9, 1, 2], 5) == ([3, 4], 2)
    assert index.propose([8, 2], 5) == ([], 0)  # (8, 2) never seen, and 1-grams are below min_ngram
    index.add([8, 2, 5])
    index.add([8, 2, 6])
    index.add([8, 2, 6])
    assert index.next_token([8, 2]) == (6, 2)  # 6 holds 2 of 3
    index.add([8, 2, 5])
    index.add([8, 2, 7])
    assert index.next_token([8, 2]) == (None, 2)  # 6 and 5 hold 2 of 5 each: below the share
    assert index.propose([1, 2], 0) == ([], 0)


@pytest.mark.parametrize("seed", range(12))
def test_next_token_equals_brute_force(seed):
    rng = random.Random(seed)
    config = TrafficConfig(max_ngram=3, min_ngram=2, share=0.4, min_count=2)
    index, sequences = TrafficIndex(config), []
    for _ in range(6):
        seq = [rng.randrange(4) for _ in range(rng.randrange(2, 12))]
        sequences.append(seq)
        index.add(seq)
        for _ in range(10):
            context = [rng.randrange(4) for _ in range(rng.randrange(0, 5))]
            assert index.next_token(context) == brute_force_next(sequences, context, config)


def test_memory_stays_within_capacity_and_keeps_what_traffic_repeats():
    index = TrafficIndex(TrafficConfig(max_ngram=2, min_ngram=2, capacity=50))
    for _ in range(64):
        index.add([1, 2, 3])  # (1, 2) -> 3, 64 times
    rng = random.Random(0)
    first = [rng.randrange(1000, 2000) for _ in range(10)]
    index.add(first)
    assert index.next_token(first[:2]) == (None, 2)  # held, seen once
    for _ in range(20):
        index.add([rng.randrange(1000, 2000) for _ in range(10)])  # distinct 2-grams, seen once
        assert len(index) <= 50 + 9  # a decay may wait until the end of the request that overflowed
    assert 1 <= index.decays <= 5
    assert len(index) <= 50
    assert index.next_token([1, 2]) == (3, 2)  # 64 halved at most 5 times: still >= min_count
    assert index.next_token(first[:2]) == (None, 0)  # forgotten at the first decay


def test_context_index_falls_back_to_traffic_only_where_its_own_match_is_one_token_at_most():
    traffic = TrafficIndex(TrafficConfig(max_ngram=3, min_ngram=2))
    for _ in range(2):
        traffic.add([5, 6, 7, 8])
    # own context: no match for (5, 6) -> traffic draft, its length negated
    assert ContextIndex([1, 5, 6], traffic=traffic).propose(3) == ([7, 8], -2)
    # own match of one token (6 occurred before, followed by 9): traffic still wins
    assert ContextIndex([6, 9, 5, 6], traffic=traffic).propose(3) == ([7, 8], -2)
    # own match of two tokens: the request's own context drafts
    assert ContextIndex([5, 6, 9, 5, 6], traffic=traffic).propose(3) == ([9, 5, 6], 2)
    # no confident traffic continuation: the own (one-token) match stays
    assert ContextIndex([6, 9, 4, 6], traffic=TrafficIndex()).propose(2) == ([9, 4], 1)
    assert ContextIndex([1, 5, 6]).propose(3) == ([], 0)  # without traffic, as before


def test_config_rejects_bad_values():
    for bad in (dict(min_ngram=0), dict(min_ngram=3, max_ngram=2), dict(share=0.0), dict(min_count=0), dict(capacity=0)):
        with pytest.raises(ValueError):
            TrafficConfig(**bad)
