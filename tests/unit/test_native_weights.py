"""Native GGUF precision: the block decoding is gguf's own, torch's int4 kernel applies exactly
those weights, and the fast engine picks its kernels per role and row count."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from common.model.engine import gguf_kernels
from common.model.engine.native_weights import AffineInt4, concat_rows, q4_1_matrix, q8_0_matrix
from common.model.engine.packed_linear import (NATIVE_KERNEL_NAMES, NATIVE_KERNELS_ENV, ROW_INVARIANT_KERNELS, NativeKernels, NativeLinear,
                                  choose_native_kernels, int4_layout)

DECODERS = {"Q4_1": q4_1_matrix, "Q8_0": q8_0_matrix}


def gguf_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, gguf's dequantisation) of a random [rows, cols] matrix quantised to `kind`."""
    weight = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    t = getattr(GGMLQuantizationType, kind)
    blocks = quants.quantize(weight, t)
    return blocks, quants.dequantize(blocks, t)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_block_decoding_reproduces_gguf_dequantisation_bit_for_bit(kind):
    blocks, reference = gguf_blocks(kind, 48, 96)
    matrix = DECODERS[kind](blocks, 48, 96)
    assert matrix.shape == (48, 96) and matrix.kind == kind
    assert len(matrix.parts) == (1 if kind == "Q4_1" else 2)
    for part in matrix.parts:
        assert part.q.dtype == torch.uint8 and int(part.q.max()) <= 15
    assert torch.equal(matrix.dequantize(), torch.from_numpy(reference))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_int4_kernel_applies_exactly_the_gguf_weights(kind):
    """Multiplying by the identity reads every weight back out of torch's int4 kernel unchanged:
    its (q - 8) * scale + zero convention with zero = offset + 8 * scale is exact."""
    blocks, reference = gguf_blocks(kind, 48, 128, seed=1)
    matrix = DECODERS[kind](blocks, 48, 128)
    assert all(int4_layout(p) is not None for p in matrix.parts)
    linear = NativeLinear(matrix)
    assert linear.int4_exact
    assert torch.equal(linear.run(torch.eye(128), "int4").t(), torch.from_numpy(reference))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_native_matmul_matches_the_dequantised_fp32_matmul(kind, rows):
    """Both kernels against F.linear on the dequantised weight. Tolerance: 1e-5 relative to the
    product's scale (sum |x||w| per output): the same weights, fp32 accumulation in another order."""
    blocks, reference = gguf_blocks(kind, 64, 256, seed=2)
    weight = torch.from_numpy(reference)
    bias = torch.randn(64)
    linear = NativeLinear(DECODERS[kind](blocks, 64, 256), bias)
    x = torch.randn(rows, 256)
    expected = torch.nn.functional.linear(x, weight, bias)
    scale = x.abs() @ weight.abs().t() + bias.abs()
    assert set(linear.available()) >= {"int4", "dense"}
    for kernel in linear.available():  # q8 rounds the activations: its own bound is tested below
        got = linear.run(x, kernel)
        assert got.shape == (rows, 64) and got.dtype == torch.float32
        if kernel != "q8":
            assert bool(((got - expected).abs() <= 1e-5 * scale).all()), kernel


def test_select_keeps_only_the_chosen_layouts_and_routes_by_row_count():
    blocks, _ = gguf_blocks("Q4_1", 32, 64)
    linear = NativeLinear(q4_1_matrix(blocks, 32, 64))
    x1, x3 = torch.randn(1, 64), torch.randn(3, 64)
    want1, want3 = linear.run(x1, "int4"), linear.run(x3, "dense")
    linear.select(NativeKernels(one_row="int4", block="dense"))
    assert torch.equal(linear(x1), want1) and torch.equal(linear(x3), want3)
    linear.select(NativeKernels("int4", "int4"))
    assert linear.available() == ["int4"]  # the other layouts are freed once nothing uses them


def test_rows_not_a_multiple_of_16_run_dense():
    blocks, reference = gguf_blocks("Q4_1", 40, 64)
    linear = NativeLinear(q4_1_matrix(blocks, 40, 64), kernels=NativeKernels("int4", "int4"))
    assert not linear.int4_exact and linear.kernels == NativeKernels("dense", "dense")
    x = torch.randn(1, 64)
    assert torch.allclose(linear(x), x @ torch.from_numpy(reference).t(), atol=1e-5)


def test_inexact_zero_point_falls_back_to_dense():
    """A block whose zero (offset + 8 scale) does not fit fp32 exactly would change the weights in
    the int4 kernel: such a matrix runs dense only, whatever is asked."""
    blocks, _ = gguf_blocks("Q4_1", 32, 32)
    matrix = q4_1_matrix(blocks, 32, 32)
    part = matrix.parts[0]
    offset = part.offset.clone()
    offset[0, 0] = 1.0 + 2.0**-20  # exact in fp32, but offset + 8 * 2^-30 is not
    scale = part.scale.clone()
    scale[0, 0] = 2.0**-30
    odd = AffineInt4((type(part)(part.q, scale, offset),), "Q4_1")
    linear = NativeLinear(odd, kernels=NativeKernels("int4", "int4"))
    assert not linear.int4_exact and linear.kernels == NativeKernels("dense", "dense")
    x = torch.randn(2, 32)
    assert torch.allclose(linear(x), x @ odd.dequantize().t(), atol=1e-5)


def test_concat_rows_stacks_parts():
    a, _ = gguf_blocks("Q8_0", 8, 64, seed=3)
    b, _ = gguf_blocks("Q8_0", 4, 64, seed=4)
    ma, mb = q8_0_matrix(a, 8, 64), q8_0_matrix(b, 4, 64)
    both = concat_rows([ma, mb])
    assert both.shape == (12, 64)
    assert torch.equal(both.dequantize(), torch.cat([ma.dequantize(), mb.dequantize()]))
    with pytest.raises(ValueError):
        concat_rows([ma, q4_1_matrix(gguf_blocks("Q4_1", 4, 64)[0], 4, 64)])


def test_kernel_choice_is_timed_or_fixed_by_the_environment(monkeypatch):
    linears = [NativeLinear(q4_1_matrix(gguf_blocks("Q4_1", 64, 64, seed=s)[0], 64, 64)) for s in range(3)]
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "dense,int4")
    assert choose_native_kernels(linears) == NativeKernels("dense", "int4")
    assert all(lin.kernels == NativeKernels("dense", "int4") for lin in linears)
    monkeypatch.delenv(NATIVE_KERNELS_ENV)
    fresh = [NativeLinear(q4_1_matrix(gguf_blocks("Q4_1", 64, 64, seed=s)[0], 64, 64)) for s in range(3)]
    choice = choose_native_kernels(fresh)
    assert choice.one_row in NATIVE_KERNEL_NAMES and choice.block in NATIVE_KERNEL_NAMES
    assert all(set(lin.available()) == {choice.one_row, choice.block} for lin in fresh)
    with pytest.raises(ValueError):
        NativeKernels("fp16", "int4")


@pytest.mark.skipif(not gguf_kernels.available(), reason="no C compiler or no AVX2/FMA here: the engine uses torch's kernels")
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_gguf_block_kernel_matches_gguf_and_is_row_invariant(kind):
    """The C kernel on the blocks as stored: the dequantised product to 1e-5 of its scale, and each
    row's result bit for bit the same in a one-row call and inside blocks of 2..20 rows (so a
    verify block and an AR step agree exactly)."""
    blocks, reference = gguf_blocks(kind, 80, 192, seed=7)
    weight = torch.from_numpy(reference)
    kernel = gguf_kernels.GgufBlocks(DECODERS[kind](blocks, 80, 192))
    x = torch.randn(20, 192)
    expected = x @ weight.t()
    got = kernel(x)
    assert bool(((got - expected).abs() <= 1e-5 * (x.abs() @ weight.abs().t())).all())
    for rows in (1, 2, 5, 16, 20):
        assert torch.equal(kernel(x[:rows]), got[:rows])
    assert torch.equal(kernel(x[7:8]), got[7:8])


@pytest.mark.skipif(not gguf_kernels.available(), reason="no C compiler or no AVX2/FMA here: the engine uses torch's kernels")
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("cols", [192, 160])  # an even and an odd number of 32-blocks per row
def test_q8_kernel_is_within_its_bound_and_bitwise_row_and_thread_invariant(kind, cols):
    """8-bit activations: against the dequantised product within the stated bound (each x off by at
    most half its block's step d = max|x| / 127, times |W|: the weights are exact and the integer
    sums too, the fp32 rounding adds 1e-5 of |x| @ |W|), against a torch emulation of the same
    rounding to fp32 summation-order error, and each row bit for bit the same in one-row calls,
    in blocks of 2..20 rows (8-row chunks) and at 1 or 2 threads."""
    blocks, reference = gguf_blocks(kind, 80, cols, seed=8)
    weight = torch.from_numpy(reference)
    kernel = gguf_kernels.GgufBlocks(DECODERS[kind](blocks, 80, cols))
    x = torch.randn(20, cols) * torch.linspace(0.1, 10, cols)  # blocks of different ranges
    x[3, 5] = 300.0  # an outlier coarsens its own block only
    got = kernel.q8(x)
    step = x.abs().reshape(20, -1, 32).amax(-1, keepdim=True) / 127
    bound = (step / 2).expand(-1, -1, 32).reshape(20, cols) @ weight.abs().t() + 1e-5 * (x.abs() @ weight.abs().t())
    assert bool(((got - x @ weight.t()).abs() <= bound).all())
    emulated = (torch.round(x.reshape(20, -1, 32) / step) * step).reshape(20, cols) @ weight.t()
    assert bool(((got - emulated).abs() <= 1e-5 * (x.abs() @ weight.abs().t()) + 1e-6).all())
    for rows in (1, 2, 5, 8, 9, 16, 20):
        assert torch.equal(kernel.q8(x[:rows]), got[:rows])
    for row in (0, 3, 13):
        assert torch.equal(kernel.q8(x[row:row + 1]), got[row:row + 1])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(kernel.q8(x), got)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not gguf_kernels.available(), reason="no C compiler or no AVX2/FMA here: the engine uses torch's kernels")
def test_q8_kernel_sums_the_largest_q4_1_products_without_overflow():
    """The extreme the AVX2 build's int16 pair sums must hold: every nibble 15 against activations
    that all quantise to -127 (a block's 16 pair sums of -3,810 each, added 8 at a time in int16,
    must not wrap). The kernel gives the exact product of the quantised operands."""
    weight = np.ones((16, 128), dtype=np.float32)
    weight[:, ::32] = 0.0  # each block's minimum 0 and step 1/15: nibbles 0 and 15
    blocks = quants.quantize(weight, GGMLQuantizationType.Q4_1)
    reference = torch.from_numpy(quants.dequantize(blocks, GGMLQuantizationType.Q4_1))
    assert int(q4_1_matrix(blocks, 16, 128).parts[0].q.max()) == 15
    kernel = gguf_kernels.GgufBlocks(q4_1_matrix(blocks, 16, 128))
    x = torch.full((3, 128), -2.0)  # |x| = max|x| in every block: q = -127 throughout
    assert torch.allclose(kernel.q8(x), x @ reference.t(), rtol=1e-6, atol=0)


@pytest.mark.skipif(not gguf_kernels.available(), reason="no C compiler or no AVX2/FMA here: the engine uses torch's kernels")
def test_probe_keeps_one_row_invariant_kernel_for_both_row_counts(monkeypatch):
    """Where the GGUF kernels run, the timed choice is one row-invariant kernel for one row and for
    blocks (so a verify block reproduces the AR step bit for bit); the environment still overrides."""
    monkeypatch.delenv(NATIVE_KERNELS_ENV, raising=False)
    linears = [NativeLinear(q4_1_matrix(gguf_blocks("Q4_1", 64, 64, seed=s)[0], 64, 64)) for s in range(3)]
    assert "q8" in linears[0].available()
    choice = choose_native_kernels(linears)
    assert choice.one_row == choice.block and choice.one_row in ROW_INVARIANT_KERNELS
    monkeypatch.setenv(NATIVE_KERNELS_ENV, "q8,dense")
    fresh = [NativeLinear(q4_1_matrix(gguf_blocks("Q4_1", 64, 64, seed=s)[0], 64, 64)) for s in range(3)]
    assert choose_native_kernels(fresh) == NativeKernels("q8", "dense")


@pytest.mark.skipif(not gguf_kernels.available(), reason="no C compiler or no AVX2/FMA here: the engine uses torch's kernels")
def test_q8_kernel_gives_the_same_bits_with_every_dot_product_instruction_set(tmp_path):
    """The AVX2 (maddubs) and AVX-VNNI builds compute the same exact integer sums as this CPU's
    build: with an even number of blocks per row their results are bitwise the same (odd counts
    add the last block in another place on AVX-512). Each build that runs on this CPU is checked."""
    import shutil

    flags = gguf_kernels._cpu_flags()
    runs_here = {"avx2": True, "avxvnni": "avx_vnni" in flags, "avx512vnni": gguf_kernels.dot_instructions() == "avx512vnni"}
    compiler = shutil.which("cc") or shutil.which("gcc")
    x = torch.randn(7, 256)
    for kind in ("Q4_1", "Q8_0"):
        blocks, _ = gguf_blocks(kind, 48, 256, seed=9)
        kernel = gguf_kernels.GgufBlocks(DECODERS[kind](blocks, 48, 256))
        expected = kernel.q8(x)
        for dot, runs in runs_here.items():
            target = gguf_kernels._build(compiler, [*gguf_kernels._FLAGS, *gguf_kernels._DOT_FLAGS[dot]], tmp_path)
            if not runs or target is None:  # this CPU cannot run it, or this compiler lacks the flag
                continue
            kernel._lib = gguf_kernels._load(target)
            assert torch.equal(kernel.q8(x), expected), (kind, dot)


def test_quantize_q8_0_is_within_half_a_step_of_the_matrix_and_runs_the_q8_kernel():
    """The drafter's merged head is quantised as llama.cpp quantises Q8_0: each weight within half
    its block's step d = max|w| / 127 (d stored fp16), zero blocks exactly zero."""
    from common.model.engine.native_weights import quantize_q8_0

    weight = torch.randn(48, 96) * torch.linspace(0.01, 3, 96)
    weight[5, :32] = 0.0
    matrix = quantize_q8_0(weight)
    assert matrix.kind == "Q8_0" and matrix.shape == (48, 96)
    step = (weight.abs().reshape(48, 3, 32).amax(-1) / 127).repeat_interleave(32, dim=1)
    assert bool(((matrix.dequantize() - weight).abs() <= 0.51 * step + 1e-7).all())
    assert torch.equal(matrix.dequantize()[5, :32], torch.zeros(32))
    if gguf_kernels.available():
        x = torch.randn(3, 96)
        got = gguf_kernels.GgufBlocks(matrix).q8(x)
        assert torch.allclose(got, x @ matrix.dequantize().t(), rtol=0.05, atol=0.05 * float(got.abs().max()))
