"""llama.cpp as a peer in `dvi bench speed`: the same GGUF file, prompts, thread count and limits.

Methods (each `prompt_ids -> (new token ids, None)`, the `MethodFn` of dvi/bench/speed.py):
  llama_cpp         llama-cpp-python's greedy decoding of the model's own GGUF file;
  llama_cpp_lookup  the same with its prompt-lookup decoding (`LlamaPromptLookupDecoding`, the
                    draft model llama-cpp-python ships: n-gram matches in the context).

The prompt is given as token ids, the ones our methods get (the chat template applied by the
model's HF tokenizer, which is the GGUF's vocabulary), so every method decodes the same input.
Decoding stops at the same EOS ids and `max_new_tokens`. llama-cpp-python is an optional extra
(`pip install -e '.[peers]'`): it compiles llama.cpp on install, so nothing else needs it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PEER_METHODS: tuple[str, ...] = ("llama_cpp", "llama_cpp_lookup")
LOOKUP_NUM_PRED_TOKENS = 10
"""Tokens llama.cpp's prompt lookup drafts per step (llama-cpp-python's default; our
hf_prompt_lookup uses the same count)."""
INSTALL_HINT = "pip install -e '.[peers]' (llama-cpp-python; compiles llama.cpp, ~15 minutes on 2 cores)"


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_method(gguf: str | Path, threads: int, max_new_tokens: int, eos_ids: set[int],
                     lookup: bool = False, context: int = 8192):
    """A method decoding greedily with llama.cpp on `gguf` (`lookup`: with its prompt lookup).
    `context`: llama.cpp's context size, at least the longest prompt plus `max_new_tokens` (the
    model's own context length: prompt lookup keeps logits of every position, 4 * context * V bytes).

    RuntimeError with the install hint when llama-cpp-python is missing."""
    if not llama_cpp_available():
        raise RuntimeError(f"methods {', '.join(PEER_METHODS)} need llama-cpp-python: {INSTALL_HINT}")
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_NUM_PRED_TOKENS) if lookup else None
    # logits_all=lookup: llama-cpp-python 0.3.36 turns logits_all on for a draft model but sizes its
    # score buffer from the argument (n_batch rows), so a prompt over 512 tokens overflows it
    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                draft_model=draft, logits_all=lookup, verbose=False)
    stop = set(eos_ids) | {int(llm.token_eos())}

    def run(prompt_ids: list[int]) -> tuple[list[int], int | None]:
        out: list[int] = []
        # reset=True: a fresh sequence (llama-cpp-python still reuses the KV cache of a common prefix)
        for token in llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                  repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if token in stop or len(out) >= max_new_tokens:
                break
        return out, None

    return run
