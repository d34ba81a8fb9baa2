"""What a weight broadcast carries and what a hot-swap costs, per exit-head shape (SmolLM2-135M, k=4).

    python benchmarks/adapter_swap.py

For the full-rank exit layer and its LoRA variant, and head LoRA ranks 8-64: trainable tensors,
the safetensors bytes of `adapter_state()` (what the weight store broadcasts) in fp32 and bf16,
and the time of `load_adapter_state` plus the first draft after it (which re-merges and re-packs
the exit head), median of 5.
"""

import statistics
import time

import torch
from safetensors.torch import save

from common.core.config import DrafterConfig, ModelSpec
from common.model.split import SplitModel


def main() -> None:
    torch.set_num_threads(1)
    base = SplitModel.load(ModelSpec(warm_start=False))
    for full, rank in ((True, 16), (False, 16), (True, 8), (True, 32), (True, 64)):
        config = DrafterConfig(full_rank_exit_layer=full, lora_rank=rank, lora_alpha=2 * rank)
        split = base.sibling(config)
        state = split.adapter_state()
        h = torch.randn(1, 1, split.hidden_size)
        times = []
        for version in range(1, 6):
            started = time.perf_counter()
            split.load_adapter_state(state, version)
            split.draft(h, torch.zeros(1, 1, dtype=torch.long), split.new_exit_cache(8))
            times.append(time.perf_counter() - started)
        bf16 = save({k: (v.bfloat16() if v.is_floating_point() else v) for k, v in state.items()})
        print(f"full_rank={full} head_rank={rank}: trainable={sum(p.numel() for p in split.trainable_parameters())} "
              f"bytes_fp32={len(save(state))} bytes_bf16={len(bf16)} swap_ms_median={1000 * statistics.median(times):.0f}")


if __name__ == "__main__":
    main()
