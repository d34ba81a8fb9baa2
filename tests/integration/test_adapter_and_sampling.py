"""The adapter changes only the drafter; speculative sampling keeps the model's distribution."""

import pytest
import torch
from scipy.stats import chisquare

from common.core.config import DecodeConfig
from common.decoding.speculative import SpeculativeDecoder
from tests.helpers import head_only, matches_model_distribution, sample_two_tokens
from tests.tiny_models import native_tiny_split, randomize_adapter, tiny_split


def test_adapter_changes_drafter_but_never_verifier():
    split = tiny_split(seed=3, exit_layer=2)
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    pos = torch.arange(6)[None]

    def both():
        cache, exit_cache = split.new_cache(), split.new_exit_cache()
        h = split.shallow(ids, pos, cache)
        return split.deep(h, pos, cache).clone(), split.draft(h, pos, exit_cache).clone()

    verifier_before, drafter_before = both()
    full_model_before = split.model(input_ids=ids).logits.clone()
    for seed in range(3):
        randomize_adapter(split, seed, scale=1.0)
        verifier_after, drafter_after = both()
        assert torch.equal(verifier_after, verifier_before)
        assert not torch.allclose(drafter_after, drafter_before, atol=1e-3)
        assert torch.equal(split.model(input_ids=ids).logits, full_model_before)
    assert all(not p.requires_grad for p in split.model.parameters())
    assert split.trainable_parameters() and all("lora_" in n or ".modules_to_save." in n for n in split.named_trainable_parameters())


def test_adapter_state_round_trip_and_shape_check():
    import pytest

    from common.core.errors import AdapterError

    split = tiny_split(seed=1, exit_layer=2)
    randomize_adapter(split, 11)
    state = split.adapter_state()
    other = tiny_split(seed=1, exit_layer=2)
    other.load_adapter_state(state, version=7)
    assert other.weight_version == 7
    for name, value in other.adapter_state().items():
        assert torch.equal(value, state[name])
    broken = dict(state)
    first = next(iter(broken))
    broken[first] = torch.zeros(3, 3)
    with pytest.raises(AdapterError, match="shape"):
        other.load_adapter_state(broken, version=8)
    assert other.weight_version == 7


@pytest.mark.parametrize("weights", ["fp32", "native"])
def test_speculative_sampling_matches_model_distribution_at_temperature_one(weights):
    """Also on native weights (a tiny Llama quantised in-test to Q4_1, the kernels the probe picks
    here): the HF model carries the dequantised values, so its distribution is the target."""
    vocab = 6
    if weights == "native":
        split = native_tiny_split(seed=2, exit_layer=1, vocab=vocab, hidden=32, layers=3)
        assert split.weights == "native"
    else:
        split = tiny_split(seed=2, exit_layer=1, vocab=vocab, hidden=16, layers=3)
    randomize_adapter(split, 2, scale=1.0)  # q far from p: the rejection path does real work
    split.eos_token_ids = set()  # let every sample run two tokens
    prompt = [3, 1, 4]
    trials = 4000
    counts, results = sample_two_tokens(
        SpeculativeDecoder(split), prompt, head_only(gamma=2, temperature=1.0, max_new_tokens=2), trials
    )
    accepted = sum(r.accepted for r in results)
    assert 0 < accepted < trials * 2  # both accept and reject paths ran
    assert matches_model_distribution(split.model, prompt, counts) > 1e-3
    # the test has power: the drafter's own distribution is rejected
    first_token = torch.tensor([sum(counts[(a, b)] for b in range(vocab)) for a in range(vocab)], dtype=torch.float64)
    with torch.no_grad():
        cache, exit_cache = split.new_cache(), split.new_exit_cache()
        ids = torch.tensor([prompt])
        pos = torch.arange(3)[None]
        q = torch.softmax(split.draft(split.shallow(ids, pos, cache), pos, exit_cache), -1).double()
    q_expected = q.numpy() * first_token.sum().item() / q.sum().item()
    assert chisquare(first_token.numpy(), q_expected).pvalue < 1e-6


def test_sampling_is_reproducible_with_a_seed():
    split = tiny_split(seed=4, exit_layer=2)
    randomize_adapter(split, 4, scale=0.3)
    decoder = SpeculativeDecoder(split)
    for config in (DecodeConfig(gamma=3, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=30),
                   head_only(gamma=3, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=30)):
        a = decoder.generate([7, 8, 9, 7, 8], config, generator=torch.Generator().manual_seed(5)).token_ids
        b = decoder.generate([7, 8, 9, 7, 8], config, generator=torch.Generator().manual_seed(5)).token_ids
        c = decoder.generate([7, 8, 9, 7, 8], config, generator=torch.Generator().manual_seed(6)).token_ids
        assert a == b and a != c


def test_trajectory_record_matches_the_decoding():
    split = tiny_split(seed=5, exit_layer=2)
    randomize_adapter(split, 5, scale=0.3)
    prompt = [4, 8, 15, 16]
    result = SpeculativeDecoder(split).generate(
        prompt, head_only(gamma=4, max_new_tokens=30, record_trajectories=True, record_topk=5), request_id="r1"
    )
    traj = result.trajectory.validate()
    assert traj.request_id == "r1" and traj.weight_version == split.weight_version
    assert traj.num_accepted == result.accepted
    sequence = prompt + result.token_ids
    for i in range(traj.num_drafted):
        p = int(traj.position[i])
        assert int(traj.target_token[i]) == sequence[p + 1]  # the verifier's committed token
        assert bool(traj.accepted[i]) == (int(traj.token[i]) == sequence[p + 1])
    assert traj.verifier_topk_ids.shape == (traj.num_drafted, 5)
    # greedy: the verifier's top-1 is the committed token
    assert torch.equal(traj.verifier_topk_ids[:, 0], traj.target_token)
    # the recorded context states are the model's own layer-k states
    cache = split.new_cache()
    n = traj.num_context
    fresh = split.shallow(torch.tensor([sequence[:n]]), torch.arange(n)[None], cache)[0]
    assert torch.allclose(traj.hidden.float(), fresh.float(), atol=1e-2)
    # and the drafter's recorded log-prob is reproduced by the training view of the exit head
    with torch.no_grad():
        logits = split.drafter_logits(traj.hidden.float(), traj.position)
    logq = torch.log_softmax(logits, -1).gather(1, traj.token[:, None])[:, 0]
    assert torch.allclose(logq, traj.drafter_logprob, atol=2e-2)
