"""Sample continuations of many prompts at once from the split's frozen HF model.

The speculative decoder serves one sequence per pass: right for latency, slow for making a
corpus. A corpus only needs text the model writes, so `sample_continuations` samples a batch of
prompts together with HF `generate` (left-padded, one forward for every row per step). The
model's forward is its HF one on the weights the split loaded it with (a GGUF's dequantised to
fp32 on CPU), so the text is the model's own sampling up to those weights' rounding; the
learning targets are scored afterwards by the verifier itself (common/decoding/teacher.py).
It is for accelerators, where a step of 64 rows costs about what one row does. On a CPU the
decoder is faster: on one core of an AMD EPYC (Zen 4 class, one torch thread) a batch of 64
samples ~175 tokens/s of SmolLM2-135M, 92 once scored, against 164 for the decoder on one
sequence at a time, so there a warm start's batches go to `SpeculativeDecoder.generate_batch`
(several sequences per pass of the decoder's own engine; learner/warmstart.py `batches_on_decoder`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig


@torch.inference_mode()
def sample_continuations(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, eos_ids: set[int],
    pad_id: int, seed: int,
) -> list[list[int]]:
    """One continuation per prompt (non-empty lists of ids), sampled together at `temperature`
    (0: greedy) with the full distribution (no top-k, top-p or penalties). Each holds 1 to
    `max_new_tokens` ids and ends at its first id in `eos_ids`, that id included, when it
    reaches one. Randomness comes from `seed` alone: the same prompts in the same order give the
    same continuations on the same machine and batch. ValueError for an empty prompt list or
    prompt, or max_new_tokens < 1."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sampling needs at least one prompt and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: every row's next token sits in the last column
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    sampled = temperature > 0
    config = GenerationConfig(
        do_sample=sampled, temperature=temperature if sampled else None, top_k=0 if sampled else None,
        top_p=1.0 if sampled else None, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids), pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    continuations = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        continuations.append(row[:end])
    return continuations
