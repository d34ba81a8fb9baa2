"""benchmarks/plateau_probe.py: the second exit layer starts as the identity and trains."""

import torch

from common.core.config import DrafterConfig
from common.model.split import SplitModel
from tests.helpers import load_benchmark
from tests.tiny_models import randomize_adapter, tiny_llama

probe = load_benchmark("plateau_probe")


def test_second_exit_layer_starts_as_the_identity_and_is_in_the_path():
    split = SplitModel(tiny_llama(seed=5, layers=4), None, DrafterConfig(exit_layer=2, lora_rank=4, lora_alpha=8),
                       "tiny-llama-5")
    randomize_adapter(split, seed=0, scale=0.05)
    hidden, at = torch.randn(6, split.hidden_size), torch.arange(6)
    before = split.drafter_logits(hidden, at)
    first = split._head.exit_block()

    new = probe.add_second_layer(split)
    trainable = {id(p) for p in split.trainable_parameters()}
    assert new and all(id(p) in trainable for p in new)
    assert torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-6)  # zeroed outputs: the identity
    with torch.no_grad():
        split._head.exit_block().second.self_attn.o_proj.weight.normal_()
    assert not torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-3)  # it runs after the exit layer

    probe.remove_second_layer(split)
    assert split._head.exit_block() is first
    assert torch.allclose(split.drafter_logits(hidden, at), before, atol=1e-6)


def test_sharpened_teacher_keeps_the_top1_and_the_hard_one_is_cross_entropy():
    from learner.losses import kl_distillation
    from tests.helpers import make_trajectory

    t = make_trajectory(n_drafted=12, k=8, vocab=50, n_verified=3, seed=2)
    t.verifier_topk_logprobs = torch.log_softmax(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), -1)
    sharp, hard = probe.sharpen_teacher(t, 0.5), probe.sharpen_teacher(t, 0.0)
    for got in (sharp, hard):
        got.validate()
        assert torch.equal(got.verifier_topk_logprobs.argmax(-1), t.verifier_topk_logprobs.argmax(-1))
        assert torch.allclose(got.verified_topk_logprobs.exp().sum(-1), torch.ones(3))
    assert (sharp.verifier_topk_logprobs.exp().max(-1).values > t.verifier_topk_logprobs.exp().max(-1).values).all()
    assert torch.equal(probe.sharpen_teacher(t, 1.0).verifier_topk_logprobs, torch.log_softmax(t.verifier_topk_logprobs, -1))
    assert t.verifier_topk_logprobs.exp().max() < 1.0  # the input is left as it was

    logits = torch.randn(12, 50)
    top1 = t.verifier_topk_ids.gather(-1, t.verifier_topk_logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    loss, _ = kl_distillation(logits, hard.verifier_topk_ids, hard.verifier_topk_logprobs)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, top1))
