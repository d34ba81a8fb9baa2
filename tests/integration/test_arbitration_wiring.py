"""The draft-source choice inside the decoder (common/core/arbitration.py wired into common/decoding/speculative.py):
whichever source a block takes, decoding stays lossless, and a block handed to the exit head drafts
exactly what the exit head alone would have drafted (its first step, run to measure confidence, is
reused, not repeated)."""

from __future__ import annotations

import pytest
import torch

import common.decoding.speculative as speculative
from common.core.arbitration import CONTEXT, HEAD
from common.core.config import DecodeConfig
from common.decoding.speculative import SpeculativeDecoder
from tests.tiny_models import randomize_adapter, stories_split

TEXTS = ("Tom and Sue went to the park. Tom and Sue", "The cat sat. The cat sat on")


def decode(split, text, config, seed=None):
    ids = split.tokenizer(text)["input_ids"]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SpeculativeDecoder(split).generate(ids, config, generator=generator)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_head_chosen_over_the_context_drafts_as_the_head_alone(monkeypatch, temperature, shared):
    """With the shared shallow pass, the context's rows leave the cache when the head takes the block."""
    split = stories_split(exit_layer=2)
    randomize_adapter(split, 3, scale=0.2)
    base = dict(gamma=3, max_new_tokens=40, temperature=temperature, confidence_threshold=0.0, adaptive_gamma=False,
                shared_shallow_pass=shared)
    asked = []

    def always_head(*args, **kwargs):
        asked.append(args[4])  # head_confidence: None first, then the measured one
        return HEAD

    monkeypatch.setattr(speculative, "choose_draft_source", always_head)
    monkeypatch.setattr(speculative, "worth_probing", lambda *args, **kwargs: True)
    for text in TEXTS:
        chosen = decode(split, text, DecodeConfig(context_tokens=5, **base), seed=7)
        alone = decode(split, text, DecodeConfig(context_tokens=0, **base), seed=7)
        assert chosen.head_over_context > 0 and chosen.context_drafted == 0
        assert chosen.token_ids == alone.token_ids
        assert (chosen.drafted, chosen.accepted, chosen.verifier_passes) == (alone.drafted, alone.accepted, alone.verifier_passes)
    assert None in asked and any(isinstance(c, float) for c in asked)


def test_arbitration_on_or_off_stays_lossless_and_reproducible(monkeypatch):
    split = stories_split(exit_layer=2)
    randomize_adapter(split, 3, scale=0.2)
    greedy = DecodeConfig(gamma=3, context_tokens=5, max_new_tokens=40)
    for text in TEXTS:
        reference = decode(split, text, DecodeConfig.autoregressive(40)).token_ids
        for arbitrate in (True, False):
            assert decode(split, text, DecodeConfig(**{**greedy.__dict__, "arbitrate": arbitrate})).token_ids == reference
        sampled = DecodeConfig(gamma=3, context_tokens=5, max_new_tokens=40, temperature=0.8)
        assert decode(split, text, sampled, seed=3).token_ids == decode(split, text, sampled, seed=3).token_ids
    monkeypatch.setattr(speculative, "choose_draft_source", lambda *args, **kwargs: CONTEXT)
    for text in TEXTS:  # the context always chosen: the rule before arbitration, token for token
        on = decode(split, text, greedy)
        off = decode(split, text, DecodeConfig(**{**greedy.__dict__, "arbitrate": False}))
        assert (on.token_ids, on.context_drafted, on.drafted) == (off.token_ids, off.context_drafted, off.drafted)


def test_costly_verify_rows_cut_context_drafts_and_decoding_stays_lossless(monkeypatch):
    """With verify rows priced (as native weights time them on a CPU where rows cost), a context
    draft is cut to the length that pays for its running acceptance: fewer context-drafted tokens,
    the same tokens out."""
    split = stories_split(exit_layer=2)
    config = DecodeConfig(gamma=0, context_tokens=5, max_new_tokens=40)
    text = TEXTS[0]
    reference = decode(split, text, DecodeConfig.autoregressive(40)).token_ids
    free = decode(split, text, config)
    draft_cost, _, probe_cost = split.costs(len(text))
    monkeypatch.setattr(type(split), "costs", lambda self, length: (draft_cost, 0.5, probe_cost))
    costly = decode(split, text, config)
    assert free.token_ids == costly.token_ids == reference
    assert 0 < costly.context_drafted < free.context_drafted
    fixed = decode(split, text, DecodeConfig(gamma=0, context_tokens=5, max_new_tokens=40, adaptive_gamma=False))
    assert fixed.context_drafted == free.context_drafted  # fixed lengths: every match in full


@pytest.mark.parametrize("shared", [True, False])
def test_a_context_block_reads_the_shallow_layers_once(shared):
    """A block with a context match runs its input and the drafted tokens through the shallow
    layers in one pass (one per block, the prefill's besides); with `shared_shallow_pass` off, the
    context's tokens take a pass of their own. Either way the tokens are the plain AR loop's."""
    split = stories_split(exit_layer=2)
    calls = []
    shallow = split.shallow
    split.shallow = lambda ids, *args, **kwargs: calls.append(ids.shape[1]) or shallow(ids, *args, **kwargs)
    text = TEXTS[0]
    reference = decode(split, text, DecodeConfig.autoregressive(40)).token_ids
    calls.clear()
    result = decode(split, text, DecodeConfig(gamma=0, context_tokens=5, max_new_tokens=40, shared_shallow_pass=shared))
    assert result.token_ids == reference and result.context_drafted > 0
    context_blocks = len(calls) - 1 - result.verifier_passes  # passes of their own
    assert context_blocks == 0 if shared else context_blocks > 0
    assert sum(calls[1:]) == result.verifier_passes + result.context_drafted
