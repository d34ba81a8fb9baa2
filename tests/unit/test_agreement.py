"""common/decoding/agreement.py: top-1 agreement of the exit head with the verifier, on hand-checkable cases.

A 2-layer Llama cut at k = 1 whose exit layer is a copy of layer 1 (the last) with a zero LoRA is
the verifier itself: drafter logits == verifier logits at every position, so agreement is exactly
1. A reduced draft vocabulary then agrees exactly where the verifier's top-1 lies inside it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from common.decoding.agreement import Agreement, agreement, exit_head_agreement, verifier_targets
from common.core.config import DrafterConfig
from common.model.split import SplitModel
from tests.tiny_models import tiny_llama

SEQUENCES = [[5, 17, 3, 40, 22, 9, 61, 8], [70, 4, 4, 33, 12]]


def verifier_copy_split(draft_vocab_size: int = 0, engine: str = "fast") -> SplitModel:
    model = tiny_llama(seed=3, layers=2)
    drafter = DrafterConfig(exit_layer=1, exit_init_layer=1, lora_rank=4, lora_alpha=8, draft_vocab_size=draft_vocab_size)
    return SplitModel(model, None, drafter, "tiny-2-layers", engine=engine)


def full_logits(split: SplitModel, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return split.model(input_ids=torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_a_drafter_equal_to_the_verifier_agrees_everywhere(engine):
    split = verifier_copy_split(engine=engine)
    result = exit_head_agreement(split, SEQUENCES)
    assert result == Agreement(agreed=13, positions=13)  # 8 + 5 positions, every one agrees
    assert result.rate == 1.0


def test_start_scores_only_later_positions():
    split = verifier_copy_split()
    assert exit_head_agreement(split, SEQUENCES, start=[6, 5]) == Agreement(agreed=2, positions=2)  # 8-6 and 5-5
    with pytest.raises(ValueError):
        exit_head_agreement(split, SEQUENCES, start=9)
    with pytest.raises(ValueError):
        exit_head_agreement(split, [[1, 2, 999]])


def test_targets_are_the_verifiers_argmax():
    split = verifier_copy_split()
    targets = verifier_targets(split, SEQUENCES)
    for seq, t in zip(SEQUENCES, targets):
        assert torch.equal(t.top1, full_logits(split, seq).argmax(-1))


def test_a_reduced_vocabulary_agrees_where_the_verifier_top1_is_inside_it():
    split = verifier_copy_split(draft_vocab_size=16)
    targets = verifier_targets(split, SEQUENCES)
    top1 = torch.cat([t.top1 for t in targets])
    # a draft vocabulary holding exactly half of the distinct top-1 ids (plus filler ids that are never top-1)
    inside = sorted(set(top1.tolist()))[::2]
    filler = [i for i in range(96) if i not in set(top1.tolist())][: 16 - len(inside)]
    split.set_draft_vocab(torch.tensor(inside + filler))
    expected = int(sum(int(t) in inside for t in top1))
    assert 0 < expected < top1.numel()
    assert agreement(split, targets) == Agreement(agreed=expected, positions=top1.numel())


def test_a_head_biased_to_one_token_agrees_only_where_the_verifier_picks_it():
    split = verifier_copy_split()
    targets = verifier_targets(split, SEQUENCES)
    top1 = torch.cat([t.top1 for t in targets])
    token = int(top1.mode().values)
    head = split._head.lm_head  # the LoRA-wrapped LM head the drafter sees
    with torch.no_grad():
        bias = torch.zeros(96)
        bias[token] = 1e4
        head.get_base_layer().bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        assert agreement(split, targets) == Agreement(agreed=int((top1 == token).sum()), positions=13)
    finally:
        head.get_base_layer().bias = None


def test_greedy_continuations_are_the_models_greedy_output():
    from common.decoding.agreement import greedy_continuations

    split = verifier_copy_split()
    sequences, starts = greedy_continuations(split, [[5, 17, 3], [70, 4]], max_new_tokens=6)
    assert starts == [2, 1]
    for seq, prompt in zip(sequences, ([5, 17, 3], [70, 4])):
        out = split.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)[0].tolist()
        assert seq == out


def test_lm_head_rows_equals_the_sliced_head_with_its_gradient():
    from common.model.split import lm_head_rows
    from tests.tiny_models import randomize_adapter

    split = verifier_copy_split()
    randomize_adapter(split, seed=1)
    head = split._head.lm_head
    x = torch.randn(3, 32)
    rows = torch.tensor([7, 1, 50])
    full = head(x)[:, rows]
    part = lm_head_rows(head, x, rows)
    assert torch.allclose(full, part, atol=1e-5)
    params = [head.lora_A["default"].weight, head.lora_B["default"].weight]
    for g_full, g_part in zip(torch.autograd.grad(full.sum(), params), torch.autograd.grad(part.sum(), params)):
        assert torch.allclose(g_full, g_part, atol=1e-5) and g_part.abs().sum() > 0
    # the frozen base rows are gathered once and reused, and gathered again when rows or the weight change
    assert torch.equal(lm_head_rows(head, x, rows), part.detach())
    other = torch.tensor([2, 50])
    assert torch.allclose(lm_head_rows(head, x, other), head(x)[:, other], atol=1e-5)
    with torch.no_grad():
        head.get_base_layer().weight.mul_(2.0)
    assert torch.allclose(lm_head_rows(head, x, other), head(x)[:, other], atol=1e-5)


def test_greedy_targets_match_the_verifiers_targets_on_the_generated_positions():
    from common.decoding.agreement import greedy_continuations, greedy_targets

    split = verifier_copy_split()
    randomize_adapter_small(split)
    prompts = [[5, 17, 3], [70, 4, 9, 9]]
    cheap = greedy_targets(split, prompts, max_new_tokens=7)
    sequences, starts = greedy_continuations(split, prompts, max_new_tokens=7)
    exact = verifier_targets(split, sequences, starts)
    for c, e in zip(cheap, exact):
        assert c.start == e.start and c.top1.shape[0] == e.top1.shape[0] - 1
        assert torch.equal(c.top1[c.start :], e.top1[e.start : -1])
    a, b = agreement(split, cheap), agreement(split, [replace(e, top1=e.top1[:-1]) for e in exact])
    assert a == b and 0 < a.agreed < a.positions


def randomize_adapter_small(split):
    from tests.tiny_models import randomize_adapter

    randomize_adapter(split, seed=4, scale=0.05)
