"""The llama.cpp peer of `dvi bench speed` (runs only where the optional extra is installed:
pip install -e '.[peers]'; CI's default path does not install it)."""

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is the optional [peers] extra")


@pytest.mark.slow
def test_llama_cpp_methods_decode_the_same_prompt_ids_greedily(smollm2_split):
    from common.model.loading import gguf_file
    from common.core.prompts import encode_prompt
    from dvi.bench.peers import llama_cpp_method

    split = smollm2_split
    ids = encode_prompt(split.tokenizer, "List three colours of the rainbow.")
    plain = llama_cpp_method(gguf_file("smollm2-135m-instruct"), 1, 24, split.eos_token_ids)
    lookup = llama_cpp_method(gguf_file("smollm2-135m-instruct"), 1, 24, split.eos_token_ids, lookup=True)
    tokens, passes = plain(ids)
    assert passes is None and 1 <= len(tokens) <= 24 and all(isinstance(t, int) for t in tokens)
    assert all(t not in split.eos_token_ids for t in tokens[:-1])  # stops at the first EOS
    assert plain(ids)[0] == tokens  # greedy: the same again (its prefix cache reused)
    # the same text our tokenizer reads back: llama.cpp decodes the same vocabulary
    assert split.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert lookup(ids)[0][:8] == tokens[:8]  # prompt lookup verifies its drafts: the same greedy start


@pytest.mark.slow
def test_llama_cpp_lookup_takes_prompts_longer_than_a_batch(smollm2_split):
    """A prompt over llama.cpp's 512-token batch: prompt lookup keeps every position's logits,
    which llama-cpp-python 0.3.36 only allocates when asked (regression: a numpy broadcast error)."""
    from common.model.loading import gguf_file
    from common.core.prompts import encode_prompt
    from dvi.bench.peers import llama_cpp_method

    split = smollm2_split
    ids = encode_prompt(split.tokenizer, "Summarise: " + "the cat sat on the mat and looked at the dog. " * 70)
    assert len(ids) > 600
    lookup = llama_cpp_method(gguf_file("smollm2-135m-instruct"), 1, 8, split.eos_token_ids, lookup=True)
    tokens, _ = lookup(ids)
    assert 1 <= len(tokens) <= 8
