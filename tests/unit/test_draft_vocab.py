"""The draft vocabulary: chosen from traffic counts, mapped for training, validated."""

import pytest
import torch

from common.model.draft_vocab import (
    checked_draft_vocab, count_tokens, draft_index, has_mass, restrict_topk, select_draft_vocab,
)


def test_select_takes_the_most_frequent_ties_by_id_and_forces_eos():
    counts = torch.tensor([0, 5, 0, 5, 9, 1, 0, 0])
    # ranked: 4 (9), 1 (5), 3 (5, higher id), 5 (1), then 0, 2, 6, 7 by id
    assert select_draft_vocab(counts, 3).tolist() == [1, 3, 4]
    assert select_draft_vocab(counts, 5).tolist() == [0, 1, 3, 4, 5]
    # EOS 7 forced in, replacing the lowest-ranked of the others
    assert select_draft_vocab(counts, 3, {7}).tolist() == [1, 4, 7]
    assert select_draft_vocab(torch.zeros(6), 2).tolist() == [0, 1]  # no traffic: the lowest ids
    with pytest.raises(ValueError):
        select_draft_vocab(counts, 0)


def test_count_tokens_accumulates():
    counts = torch.zeros(5, dtype=torch.int64)
    count_tokens(counts, torch.tensor([1, 1, 4]))
    count_tokens(counts, torch.tensor([4]))
    assert counts.tolist() == [0, 2, 0, 0, 2]


def test_draft_index_and_restricted_topk():
    lookup = draft_index(torch.tensor([2, 5, 7]), 8)
    assert lookup.tolist() == [-1, -1, 0, -1, -1, 1, -1, 2]
    ids = torch.tensor([[5, 3, 2], [0, 1, 3]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]))
    mapped, restricted = restrict_topk(ids, logprobs, lookup)
    assert mapped.tolist() == [[1, 0, 0], [0, 0, 0]]
    assert torch.isinf(restricted[0, 1]) and torch.allclose(restricted[0, [0, 2]], logprobs[0, [0, 2]])
    assert has_mass(restricted).tolist() == [True, False]  # row 2 has no in-vocabulary id


def test_checked_draft_vocab_sorts_and_refuses_bad_ids():
    assert checked_draft_vocab(torch.tensor([3, 1, 2]), 4).tolist() == [1, 2, 3]
    for bad, message in ((torch.tensor([1, 1]), "distinct"), (torch.tensor([5]), r"\[0, 4\)"),
                         (torch.tensor([], dtype=torch.int64), "non-empty"), (torch.tensor([1.0]), "int64")):
        with pytest.raises(ValueError, match=message):
            checked_draft_vocab(bad, 4)
