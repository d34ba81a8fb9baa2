"""`SpeculativeDecoder.generate_batch`: many requests per verifier pass, each decoded exactly as
`generate` decodes it alone (drafting off), so a corpus made in batches is the same text and the
same learning record as one made request by request."""

import pytest
import torch

from common.core.config import DecodeConfig
from common.decoding.speculative import SpeculativeDecoder
from common.model.engine.packed_linear import NATIVE_KERNELS_ENV
from tests.tiny_models import native_tiny_split, tiny_split

PROMPTS = [[5, 17, 33, 9, 41], [3, 3, 3, 8, 3, 3, 8], [60, 61, 62, 63, 60, 61], [11], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
FIELDS = ("tokens", "hidden", "position", "verifier_topk_ids", "verifier_topk_logprobs", "prompt_length")


def records(split, config: DecodeConfig, batch: bool, rows: int = 3, seed: int = 0):
    """(token ids, trajectory fields) of every prompt, decoded in batches of `rows` or one by one,
    request i sampling from a generator seeded with seed + i."""
    decoder = SpeculativeDecoder(split)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    if batch:
        results = decoder.generate_batch(PROMPTS, config, generators=generators, request_ids=ids, rows=rows)
    else:
        results = [decoder.generate(p, config, generator=g, request_id=r) for p, g, r in zip(PROMPTS, generators, ids)]
    return [(r.token_ids, r.verifier_passes, {f: getattr(r.trajectory, f) for f in FIELDS}) for r in results]


def corpus_config(temperature: float, max_new_tokens: int = 12) -> DecodeConfig:
    return DecodeConfig(gamma=0, context_tokens=0, temperature=temperature, max_new_tokens=max_new_tokens,
                        record_trajectories=True, record_topk=8, record_prompt_positions=1_000_000)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_batch_decodes_every_request_bit_for_bit_as_alone_on_the_q8_kernel(monkeypatch, temperature):
    """Rows of different sequences, lengths and finishing times share each pass; with the q8
    kernel (every row computed alone) each request's tokens, states and verifier targets equal its
    solo decoding exactly, greedy and sampled (the same draw from the same generator)."""
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "q8")
    split = native_tiny_split(seed=3, exit_layer=2, vocab=96, layers=4)
    assert all(layer.c_ops for layer in split._fast.layers)  # the batched path, not its per-row fallback
    split.eos_token_ids = set(range(2, 96, 9))  # requests finish at different steps
    solo = records(split, corpus_config(temperature), batch=False)
    batched = records(split, corpus_config(temperature), batch=True)
    for (tokens, passes, fields), (b_tokens, b_passes, b_fields) in zip(solo, batched):
        assert b_tokens == tokens and b_passes == passes == len(tokens)
        for name, value in fields.items():
            other = b_fields[name]
            assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, name
    assert len({len(t) for t, _, _ in solo}) > 1  # so a finished request's row went to a waiting one


def test_a_batch_on_dense_weights_matches_solo_decoding_to_rounding():
    """Dense fp32 matrices may sum a row differently next to other rows: the targets agree to
    rounding and, on this model, the greedy text is the same."""
    split = tiny_split(seed=4, exit_layer=2)
    split.eos_token_ids = set()
    solo = records(split, corpus_config(0.0), batch=False)
    batched = records(split, corpus_config(0.0), batch=True, rows=4)
    for (tokens, _, fields), (b_tokens, _, b_fields) in zip(solo, batched):
        assert b_tokens == tokens
        torch.testing.assert_close(b_fields["verifier_topk_logprobs"], fields["verifier_topk_logprobs"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b_fields["hidden"].float(), fields["hidden"].float(), atol=1e-2, rtol=1e-2)


def test_generate_batch_refuses_drafting_and_mismatched_arguments():
    split = tiny_split(seed=4, exit_layer=2)
    decoder = SpeculativeDecoder(split)
    with pytest.raises(ValueError, match="does not draft"):
        decoder.generate_batch(PROMPTS, DecodeConfig(gamma=4, max_new_tokens=4))
    with pytest.raises(ValueError, match="does not draft"):
        decoder.generate_batch(PROMPTS, DecodeConfig(gamma=0, context_tokens=5, max_new_tokens=4))
    with pytest.raises(ValueError, match="one generator"):
        decoder.generate_batch(PROMPTS, corpus_config(0.0), generators=[None])
    with pytest.raises(ValueError, match="rows"):
        decoder.generate_batch(PROMPTS, corpus_config(0.0), rows=0)
