"""benchmarks/deep_kv_head_probe.py: which keys and values the exit layer reads at each draft depth."""

import torch

from tests.helpers import load_benchmark
from tests.tiny_models import tiny_split

probe = load_benchmark("deep_kv_head_probe")
T = 10


def _head(keys: str):
    split = tiny_split(seed=3, exit_layer=2)
    torch.manual_seed(0)
    head = probe.DeepKVHead(split, 2, torch.arange(split.vocab_size), keys)
    with torch.no_grad():  # make the deep path differ from the shallow one
        for module in (head.deep_norm, head.deep_k, head.deep_v):
            for p in module.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return head, torch.randn(T, split.hidden_size), torch.randn(T, split.hidden_size)


def test_all_shallow_keys_give_the_exit_head_and_deep_states_change_it():
    for keys in ("replace", "both", "gated"):
        head, h, D = _head(keys)
        with torch.no_grad():
            shipped = head.logits(head.state(h))
            if keys == "replace":  # a depth covering the whole sequence leaves no verified position
                assert torch.allclose(head.run(h, D, T), shipped, atol=1e-5)
            elif keys == "both":
                head.deep_bias.fill_(-1e9)
                assert torch.allclose(head.run(h, D, 1), shipped, atol=1e-5)
                head.deep_bias.fill_(0.0)
            else:  # the gate starts closed
                assert torch.allclose(head.run(h, D, 1), shipped, atol=1e-5)
                head.deep_gate.fill_(1.0)
            assert not torch.allclose(head.run(h, D, 1), shipped, atol=1e-3)


def test_a_draft_reads_deep_states_of_verified_positions_only():
    for keys in ("replace", "both", "gated"):
        head, h, D = _head(keys)
        if keys == "gated":
            with torch.no_grad():
                head.deep_gate.fill_(1.0)
        for depth in (1, 2, 3):
            t = 6  # positions t - depth + 1 .. t are drafts; earlier ones are verified
            with torch.no_grad():
                before = head.run(h, D, depth)
                changed = D.clone()
                changed[t - depth + 1:] += 5.0  # the deep states of the block's drafts (and later): unused at t
                assert torch.allclose(head.run(h, changed, depth)[: t + 1], before[: t + 1], atol=1e-6)
                changed = D.clone()
                changed[t - depth] = 3.0 * torch.randn(D.shape[1])  # the last verified position's deep state: read at t
                assert (head.run(h, changed, depth)[t] - before[t]).abs().max() > 1e-5
                changed = h.clone()
                changed[t + 1:] += 5.0  # causal: later shallow states are never read
                assert torch.allclose(head.run(changed, D, depth)[: t + 1], before[: t + 1], atol=1e-6)
                if keys == "replace":  # a verified position's shallow state is not read at t
                    changed = h.clone()
                    changed[t - depth] = 3.0 * torch.randn(h.shape[1])
                    assert torch.allclose(head.run(changed, D, depth)[t], before[t], atol=1e-6)


def test_a_head_from_the_split_s_drafter_scores_as_its_drafter():
    from tests.tiny_models import randomize_adapter

    split = tiny_split(seed=4, exit_layer=2, draft_vocab_size=40)
    randomize_adapter(split, seed=1, scale=0.05)
    h = torch.randn(T, split.hidden_size)
    expected = split.drafter_logits(h, torch.arange(T), rows=split.draft_vocab)
    for head in (probe.Head(split, 2, split.draft_vocab, fuse=False), probe.DeepKVHead(split, 2, split.draft_vocab, "gated")):
        before = head(h, None) if not isinstance(head, probe.DeepKVHead) else head.run(h, h, 1)
        assert not torch.allclose(before, expected, atol=1e-3)  # a copy of layer k is not the trained drafter
        probe.from_warm_start(head, split)
        with torch.no_grad():
            after = head(h, None) if not isinstance(head, probe.DeepKVHead) else head.run(h, torch.randn(T, split.hidden_size), 1)
        assert torch.allclose(after, expected, atol=1e-5)
