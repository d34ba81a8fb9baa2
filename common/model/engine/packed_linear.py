"""A frozen linear layer stored in the layouts that are fastest for batch-1 decoding.

Decoding one sequence multiplies a handful of rows by every weight matrix of the model: the
cost is reading the weights, not the arithmetic. How fast a weight streams depends on the kernel
torch picks for the shape, and on CPU the default (`F.linear`, MKL's GEMM on the [N, K] weight)
is the slow choice at both batch sizes a speculative decoder runs:

  T > 1   (a verification block, a prefill): oneDNN's GEMM on a weight prepacked for its blocked
          layout (the layout inductor's freezing pass uses), whose time hardly grows from T = 1 to
          T ~ 16, where F.linear's doubles by T = 6;
  T == 1  (one drafted token, one AR step): which kernel wins depends on the CPU. On an Intel
          Xeon measured here `x @ W_t` (W_t = W^T stored [K, N] contiguous: MKL's row-streaming
          GEMV) beat the prepacked GEMM; on an AMD EPYC the prepacked GEMM was ~1.4x faster
          than the GEMV (one-row forward of SmolLM2-135M: 29 ms -> 21 ms). `cpu_kernels()` times
          both once per process on a weight larger than the last-level cache and keeps the faster.

oneDNN's kernel for exactly two rows was slower than for three on the Xeon (a two-token block
cost a third more than a three-token one); where the probe finds that, two rows are padded to
three. `benchmarks/cost_breakdown.py` prints the per-piece times and the kernels chosen. On CUDA
and on CPUs without oneDNN the layer is a plain `F.linear` on the weight as it is (no copy).

Numerics: every path computes the same product in the weight's dtype with fp32 accumulation, but
not in the same order, so results differ from F.linear's in the last bits (~1e-6 relative in
fp32). Greedy decoding stays the model's own except at exact near-ties of the top two logits,
which `dvi bench speed` counts (`identical_to_ar`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PREPACK_BATCH_HINT = 8
"""The batch size oneDNN's prepacked layout is tuned for: a verification block of gamma + 1 rows."""


@functools.cache
def onednn_prepack_available() -> bool:
    """True when torch's oneDNN linear with a prepacked weight runs here (a one-off CPU probe)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(8, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PREPACK_BATCH_HINT)
        x = torch.randn(3, 4)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(y, F.linear(x, w), atol=1e-5))
    except (RuntimeError, AttributeError) as exc:  # an op missing from this build
        log.info("oneDNN prepacked linear unavailable (%s); CPU blocks use F.linear", exc)
        return False


KERNELS_ENV = "DVI_CPU_KERNELS"
"""Set to `gemv` or `packed` to fix the one-row kernel instead of timing it (e.g. to compare
runs bit for bit across machines); two-row padding then follows the Xeon measurement (on for
`gemv`, off for `packed`)."""


@dataclass(frozen=True)
class CpuKernels:
    """The CPU kernels `PackedLinear` uses: `single_row` is `gemv` (x @ W^T contiguous) or
    `packed` (oneDNN's prepacked GEMM) for one row; `pad_two_rows` runs two rows as three."""

    single_row: str = "gemv"
    pad_two_rows: bool = True

    def __post_init__(self):
        if self.single_row not in ("gemv", "packed"):
            raise ValueError(f"single_row must be 'gemv' or 'packed', got {self.single_row!r}")


def best_seconds(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_kernels() -> CpuKernels:
    """The faster one-row kernel on this CPU and whether two rows are better padded to three,
    from a one-off timing (~0.25 s, at the first CPU fp32 layer built) of a SmolLM2-sized MLP
    weight streamed from memory, or from `DVI_CPU_KERNELS`. Without oneDNN prepacking: gemv,
    no padding."""
    forced = os.environ.get(KERNELS_ENV, "").strip().lower()
    if forced:
        return CpuKernels(forced, pad_two_rows=forced == "gemv")
    if not onednn_prepack_available():
        return CpuKernels("gemv", pad_two_rows=False)
    # 12 distinct [3072, 576] weights (85 MB) so every call streams from memory, not cache
    weights = [torch.randn(3072, 576) for _ in range(12)]
    rows_t = [w.t().contiguous() for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PREPACK_BATCH_HINT) for w in weights]

    def run_packed(rows: int):
        x = torch.randn(rows, 576)
        return lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]

    one = torch.randn(1, 576)
    run_packed(3)()  # oneDNN's first call per shape builds its kernel
    gemv = best_seconds(lambda: [torch.mm(one, w) for w in rows_t])
    kernels = CpuKernels(
        "packed" if best_seconds(run_packed(1)) < gemv else "gemv",
        pad_two_rows=best_seconds(run_packed(3)) < best_seconds(run_packed(2)),
    )
    log.info("CPU linear kernels: %s", kernels)
    return kernels


class PackedLinear:
    """y = x @ W^T + b for a frozen weight W [N, K] (bias b [N] or None), inference only.

    __call__(x [T, K]) -> [T, N] in W's dtype; x must be 2-D and on W's device. The layouts are
    copies made once here: change W afterwards and this layer does not see it (rebuild it).
    `kernels` picks the CPU paths (default: `cpu_kernels()`, this CPU's faster ones).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, kernels: CpuKernels | None = None):
        assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self._itemsize = weight.element_size()
        self.bias = None if bias is None else bias.detach().contiguous()
        self._cpu = weight.device.type == "cpu"
        self._rows_t = self._packed = self._weight = None
        self._pad_two = False
        if not self._cpu:
            self._weight = weight
            return
        if weight.dtype == torch.float32 and onednn_prepack_available():
            kernels = kernels or cpu_kernels()  # probed only where there is a choice to make
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PREPACK_BATCH_HINT)
            self._pad_two = kernels.pad_two_rows
            single_row_gemv = kernels.single_row == "gemv"
        else:
            self._weight = weight
            single_row_gemv = True
        if single_row_gemv:
            self._rows_t = weight.t().contiguous()  # [K, N]: the one-row GEMV layout

    def bytes_read(self, rows: int = 1) -> int:
        """Bytes of weight one call on `rows` rows streams (the layout its kernel reads)."""
        return self.out_features * self.in_features * self._itemsize  # every layout holds W once

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows_t is not None and x.shape[0] == 1:
            y = torch.mm(x, self._rows_t)
            return y if self.bias is None else y + self.bias
        if self._packed is not None:
            if self._pad_two and x.shape[0] == 2:
                return torch.ops.mkldnn._linear_pointwise(
                    torch.cat([x, x[:1]]), self._packed, self.bias, "none", [], "")[:2]
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self._weight, self.bias)


# --------------------------------------------------------------------------- native 4-bit weights
INT4_GROUP = 32
NATIVE_KERNELS_ENV = "DVI_NATIVE_KERNELS"
"""Fix the kernels of native (GGUF-precision) matrices instead of timing them: `q8`, `gguf`, `int4`
or `dense` for both row counts, or `ONE_ROW,BLOCK` (e.g. `gguf,dense`)."""
NATIVE_KERNEL_NAMES = ("q8", "gguf", "int4", "dense")
ROW_INVARIANT_KERNELS = ("q8", "gguf")
"""Kernels whose result for a row is bitwise the same whatever the number of rows in the call
(common/model/engine/gguf_kernels.py): with one of them for both row counts a verify block reproduces the
one-row AR step exactly."""
PROBE_BLOCK_ROWS = 5
"""The block size the native-kernel probe times: a typical verification block (gamma 4-5 + 1)."""


@dataclass(frozen=True)
class NativeKernels:
    """Which kernel a `NativeLinear` runs for one row (`one_row`) and for 2+ rows (`block`):
    `q8` (common/model/engine/gguf_kernels.py: the GGUF blocks as stored against activations quantised per row
    to 8-bit blocks, integer dot products), `gguf` (the same blocks against fp32 activations),
    `int4` (torch's CPU int4 kernel on the 4-bit parts, fp32 activations, group size 32) or
    `dense` (a `PackedLinear` over the dequantised fp32 matrix). All apply exactly the same weight
    values; the fp32 ones differ only in the summation order of the product, `q8` also rounds each
    activation to 8 bits of its block's range (GgufBlocks.q8 states the bound)."""

    one_row: str = "int4"
    block: str = "int4"

    def __post_init__(self):
        for name in (self.one_row, self.block):
            if name not in NATIVE_KERNEL_NAMES:
                raise ValueError(f"native kernel must be one of {NATIVE_KERNEL_NAMES}, got {name!r}")

    @classmethod
    def from_env(cls) -> "NativeKernels | None":
        """The choice `DVI_NATIVE_KERNELS` fixes, or None when it is unset."""
        forced = [s.strip().lower() for s in os.environ.get(NATIVE_KERNELS_ENV, "").split(",") if s.strip()]
        if not forced:
            return None
        return cls(forced[0], forced[-1])


def int4_kernels_available() -> bool:
    """True when this torch build has the CPU int4 weight-only kernels (torch >= 2.5)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_layout(part) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed [N, K/2] uint8, scales_and_zeros [K/32, N, 2] fp32) of one `Int4Part` for
    `_weight_int4pack_mm_for_cpu`, or None when the part cannot be represented exactly.

    torch's int4 format dequantises w = (q - 8) * scale + zero (tinygemm's convention, checked
    against gguf's dequantisation in the tests), so zero = offset + 8 * scale; that sum must be
    exact in fp32 for the kernel to apply the same weights (it is for every block of the shipped
    SmolLM2 file: fp16 scales and offsets of similar magnitude). The kernel also needs N to be a
    multiple of 16."""
    rows, cols = part.q.shape
    if rows % 16 or cols % INT4_GROUP:
        return None
    zero = part.offset + 8 * part.scale
    if not torch.equal(zero.double(), part.offset.double() + 8 * part.scale.double()):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(part.q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([part.scale.t(), zero.t()], dim=-1).contiguous()
    return packed, scales_and_zeros


class NativeLinear:
    """y = x @ W^T + b for a frozen weight W held at its native precision (an `AffineInt4`, e.g. a
    Q4_1 or Q8_0 GGUF matrix), CPU and fp32 activations only.

    __call__(x [T, K] fp32) -> [T, N] fp32. Until `select` is called every layout available here
    is held so a probe (`choose_native_kernels`) can time them; `select` keeps the chosen ones. A
    kernel that cannot run a matrix (int4 where its 4-bit form would not be exact or N is not a
    multiple of 16; gguf without a compiled kernel) is replaced by `dense`.
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, kernels: NativeKernels | None = None):
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self.kind = weight.kind
        self.bytes_per_weight = weight.bytes_per_weight
        from common.model.engine import gguf_kernels

        wanted = set(NATIVE_KERNEL_NAMES) if kernels is None else {kernels.one_row, kernels.block, "dense"}
        layouts = [int4_layout(p) for p in weight.parts] if int4_kernels_available() and "int4" in wanted else [None]
        self._int4 = None if any(layout is None for layout in layouts) else layouts
        self._blocks = gguf_kernels.blocks_or_none(weight) if wanted & {"q8", "gguf"} else None
        self._block_kernels = ("q8", "gguf")
        self._dense = PackedLinear(weight.dequantize(), bias)
        self.kernels = NativeKernels(*[self.best_available()] * 2)  # every layout held until `select`
        if kernels is not None:
            self.select(kernels)

    @property
    def int4_exact(self) -> bool:
        return self._int4 is not None

    def available(self) -> list[str]:
        """The kernels this matrix can run here, in NATIVE_KERNEL_NAMES order."""
        held = {"int4": self._int4, "dense": self._dense}
        held.update({k: self._blocks for k in self._block_kernels})  # q8 and gguf share the blocks
        return [k for k in NATIVE_KERNEL_NAMES if held.get(k) is not None]

    def best_available(self) -> str:
        return self.available()[0]

    def select(self, kernels: NativeKernels) -> None:
        """Run `kernels` from now on (each replaced by dense where this matrix cannot run it) and
        free the layouts they do not use."""
        can = self.available()
        kernels = NativeKernels(*(k if k in can else "dense" for k in (kernels.one_row, kernels.block)))
        used = {kernels.one_row, kernels.block}
        self._block_kernels = tuple(k for k in ("q8", "gguf") if k in used)
        if not self._block_kernels:
            self._blocks = None
        if "int4" not in used:
            self._int4 = None
        if "dense" not in used:
            self._dense = None
        self.kernels = kernels

    def bytes_read(self, rows: int = 1) -> int:
        """Bytes of weight one call on `rows` rows streams with the kernel chosen for that count."""
        kernel = self.kernels.one_row if rows == 1 else self.kernels.block
        if kernel == "dense":
            return self._dense.bytes_read(rows)
        if kernel in ("gguf", "q8"):
            return self._blocks.bytes_read()
        return sum(p.numel() * p.element_size() + sz.numel() * sz.element_size() for p, sz in self._int4)

    def run(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        if kernel == "dense":
            return self._dense(x)
        if kernel in ("gguf", "q8"):
            y = self._blocks.q8(x) if kernel == "q8" else self._blocks(x)
            return y if self.bias is None else y + self.bias
        y = None
        for packed, scales_and_zeros in self._int4:
            part = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_and_zeros)
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self.kernels.one_row if x.shape[0] == 1 else self.kernels.block)


def _time_kernels(linears: list[NativeLinear], rows: int, kernels: list[str], repeats: int,
                  skip_above: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds of one pass over `linears` on `rows` random rows, per kernel. A kernel 50% over the
    best so far is timed once only; one whose `skip_above` time (its one-row time) already exceeds
    the best is not timed (a block never costs less than one row)."""
    x = torch.randn(rows, linears[0].in_features)
    seconds: dict[str, float] = {}
    for kernel in kernels:
        run = lambda kernel=kernel: [lin.run(x, kernel) for lin in linears]  # noqa: E731
        best = min(seconds.values(), default=float("inf"))
        if skip_above is not None and skip_above.get(kernel, 0.0) > best:
            continue
        run()  # warm: oneDNN builds its kernel on the first call per shape
        seconds[kernel] = best_seconds(run, 1)
        if seconds[kernel] < 1.5 * best:
            seconds[kernel] = min(seconds[kernel], best_seconds(run, repeats))
    first = linears[0]
    log.info("native %s [%d x %d] x %d matrices, %d row(s): %s", first.kind, first.out_features,
             first.in_features, len(linears), rows, ", ".join(f"{k} {1e3 * s:.2f} ms" for k, s in seconds.items()))
    return seconds


def choose_native_kernels(linears: list[NativeLinear], repeats: int = 2) -> NativeKernels:
    """Pick the kernels of one role (the same matrix across all layers, so the weights stream
    from memory as in decoding), `select` them on each linear and return them.

    `DVI_NATIVE_KERNELS`, when set, is taken as it is. Otherwise, where a row-invariant kernel
    (`ROW_INVARIANT_KERNELS`) runs every matrix, the one with the least time for one row plus a
    block of `PROBE_BLOCK_ROWS` rows runs both row counts: a verify block then reproduces the AR
    step bit for bit. Elsewhere each row count gets its fastest kernel by timing."""
    forced = NativeKernels.from_env()
    candidates = [k for k in NATIVE_KERNEL_NAMES if all(k in lin.available() for lin in linears)]
    invariant = [k for k in candidates if k in ROW_INVARIANT_KERNELS]
    if forced is not None or candidates == ["dense"]:
        choice = forced or NativeKernels("dense", "dense")
    elif invariant:
        one_row = _time_kernels(linears, 1, invariant, repeats)
        block = _time_kernels(linears, PROBE_BLOCK_ROWS, invariant, repeats)
        best = min(block, key=lambda k: one_row[k] + block[k])
        choice = NativeKernels(best, best)
    else:
        one_row = _time_kernels(linears, 1, candidates, repeats)
        block = _time_kernels(linears, PROBE_BLOCK_ROWS, candidates, repeats, skip_above=one_row)
        choice = NativeKernels(min(one_row, key=one_row.get), min(block, key=block.get))
    for lin in linears:
        lin.select(choice)
    return choice
