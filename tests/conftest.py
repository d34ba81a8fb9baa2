"""Shared fixtures. SmolLM2 is loaded once per session (it is the default model)."""

import pytest
import torch

# Tiny models run fastest on one thread, and on a shared 2-core box more threads oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_split():
    from common.core.config import DrafterConfig, ModelSpec
    from common.model.split import SplitModel
    from tests.tiny_models import randomize_adapter

    split = SplitModel.load(ModelSpec(model="smollm2-135m-instruct", drafter=DrafterConfig(exit_layer=8)))
    randomize_adapter(split, seed=0, scale=0.02)  # some acceptance variety; the verifier is untouched
    return split
