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


def test_prompt_positions_only_keeps_what_predicts_the_prompt_and_nothing_generated():
    from dataclasses import replace

    from tests.helpers import make_trajectory

    def with_verified(t, where):
        where = torch.tensor(where, dtype=torch.int64)
        logprobs = torch.log_softmax(torch.randn(len(where), 4, generator=torch.Generator().manual_seed(1)), -1)
        return replace(t, verified_position=where, verified_topk_ids=torch.randint(0, 100, (len(where), 4)),
                       verified_topk_logprobs=logprobs).validate()

    drafted = make_trajectory(n_drafted=6, k=4, seed=3)
    P = drafted.prompt_length
    committed = [p for p in range(P, drafted.num_context) if p not in set(drafted.position.tolist())]
    t = with_verified(drafted, list(range(P - 1)) + committed[:2])
    cut = probe.prompt_positions_only(t)
    assert cut.num_drafted == 0 and cut.num_context == P and cut.tokens.tolist() == t.tokens[:P + 1].tolist()
    assert cut.verified_position.tolist() == list(range(P - 1))
    assert torch.equal(cut.verified_topk_logprobs, t.verified_topk_logprobs[: P - 1])
    assert torch.equal(cut.hidden, t.hidden[:P])

    # Without drafts the prefill's last position (P - 1) is verified too: it predicts the first
    # generated token, so it goes.
    plain = with_verified(make_trajectory(n_drafted=0, n_context=P + 5, k=4, seed=4), list(range(P + 3)))
    assert probe.prompt_positions_only(plain).verified_position.tolist() == list(range(P - 1))


def test_scored_prompts_file_holds_exactly_the_prompts_the_probe_scores(tmp_path):
    from common.core.prompts import load_prompts
    from dvi.bench.drafter_probe import texts_by_category
    from dvi.bench.learning import split_train_eval
    from dvi.data import SPEC_BENCH_DEV

    _, held_half = split_train_eval(load_prompts(SPEC_BENCH_DEV))
    probe.write_scored_prompts(tmp_path / "scored.jsonl", held_half, 3)
    written = load_prompts(tmp_path / "scored.jsonl")
    assert texts_by_category(written, 3) == texts_by_category(held_half, 3)
    assert len(written) == sum(map(len, texts_by_category(held_half, 3).values()))
