"""PackedLinear computes F.linear in every batch-size path; StaticKVCache appends, crops and grows."""

import pytest
import torch
import torch.nn.functional as F

from common.model.engine.kv_cache import StaticKVCache
from common.model.engine import packed_linear
from common.model.engine.packed_linear import CpuKernels, PackedLinear, cpu_kernels

KERNEL_CHOICES = [CpuKernels("gemv", pad_two_rows=True), CpuKernels("packed", pad_two_rows=False), None]


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 17])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("kernels", KERNEL_CHOICES, ids=["gemv+pad", "packed", "probed"])
def test_packed_linear_matches_f_linear(rows, with_bias, kernels):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 24, generator=g)
    bias = torch.randn(48, generator=g) if with_bias else None
    x = torch.randn(rows, 24, generator=g)
    layer = PackedLinear(weight, bias, kernels=kernels)
    assert torch.allclose(layer(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert (layer.out_features, layer.in_features) == (48, 24)


def test_cpu_kernels_can_be_fixed_by_environment(monkeypatch):
    monkeypatch.setenv(packed_linear.KERNELS_ENV, "packed")
    cpu_kernels.cache_clear()
    try:
        assert cpu_kernels() == CpuKernels("packed", pad_two_rows=False)
        monkeypatch.setenv(packed_linear.KERNELS_ENV, "gemm")
        cpu_kernels.cache_clear()
        with pytest.raises(ValueError, match="single_row"):
            cpu_kernels()
    finally:
        cpu_kernels.cache_clear()


def test_layers_without_a_kernel_choice_do_not_probe(monkeypatch):
    def no_probe():
        raise AssertionError("cpu_kernels() probed for a layer that only has the GEMV path")

    monkeypatch.setattr(packed_linear, "cpu_kernels", no_probe)
    weight = torch.randn(8, 4, dtype=torch.bfloat16)  # no prepacked layout below fp32: GEMV only
    x = torch.randn(1, 4, dtype=torch.bfloat16)
    assert torch.allclose(PackedLinear(weight)(x).float(), F.linear(x, weight).float(), atol=1e-2)


def test_packed_linear_copies_its_weight():
    weight = torch.randn(6, 4)
    layer = PackedLinear(weight)
    before = layer(torch.ones(3, 4)).clone()
    weight.zero_()  # the packed layouts are copies made at construction
    assert torch.allclose(layer(torch.ones(3, 4)), before)


def test_static_cache_append_crop_and_independent_layers():
    cache = StaticKVCache(num_layers=2, kv_heads=2, head_dim=3, capacity=4, dtype=torch.float32)
    k = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3)
    keys, values = cache.append(0, k, -k)
    assert keys.shape == (2, 3, 3) and torch.equal(keys, k) and torch.equal(values, -k)
    assert (cache.get_seq_length(0), cache.get_seq_length(1)) == (3, 0)  # layers fill independently
    cache.crop(1)
    assert cache.get_seq_length(0) == 1
    keys, _ = cache.append(0, k[:, :1] + 100, k[:, :1])
    assert torch.equal(keys[:, 0], k[:, 0]) and torch.equal(keys[:, 1], k[:, 0] + 100)
    cache.crop(10)  # longer than held: unchanged
    assert cache.get_seq_length(0) == 2
    with pytest.raises(ValueError):
        cache.crop(-1)


def test_static_cache_grows_and_keeps_its_content():
    cache = StaticKVCache(num_layers=1, kv_heads=1, head_dim=2, capacity=2, dtype=torch.float32)
    first = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    cache.append(0, first, first)
    keys, values = cache.append(0, torch.tensor([[[5.0, 6.0]]]), torch.tensor([[[7.0, 8.0]]]))
    assert cache.capacity >= 3
    assert torch.equal(keys, torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]))
    assert torch.equal(values[:, 2], torch.tensor([[7.0, 8.0]]))


def test_static_cache_refuses_empty_shapes():
    with pytest.raises(ValueError, match="positive"):
        StaticKVCache(num_layers=0, kv_heads=1, head_dim=1, capacity=1, dtype=torch.float32)
