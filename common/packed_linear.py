"""A frozen linear layer stored in the layouts that are fastest for batch-1 decoding.

Decoding one sequence multiplies a handful of rows by every weight matrix of the model: the
cost is reading the weights, not the arithmetic. How fast a weight streams depends on the kernel
torch picks for the shape, and on CPU the default (`F.linear`, MKL's GEMM on the [N, K] weight)
is the slow choice at both batch sizes a speculative decoder runs:

  T == 1  (one drafted token, one AR step): `x @ W_t` with W_t = W^T stored [K, N] contiguous is
          MKL's row-streaming GEMV, about twice F.linear's speed on wide outputs (the QKV and
          gate/up projections, the LM head) on the CPUs measured here;
  T > 1   (a verification block, a prefill): oneDNN's GEMM on a weight prepacked for its blocked
          layout (the layout inductor's freezing pass uses), whose time hardly grows from T = 1 to
          T ~ 16, where F.linear's doubles by T = 6.

oneDNN's kernel for exactly two rows was slower than for three on the CPU measured here (a
two-token block cost a third more than a three-token one), so two rows are padded to three.
`benchmarks/cost_breakdown.py` prints the per-piece times that motivated this. On CUDA and on
CPUs without oneDNN the layer is a plain `F.linear` on the weight as it is (no copy).

Numerics: every path computes the same product in the weight's dtype with fp32 accumulation, but
not in the same order, so results differ from F.linear's in the last bits (~1e-6 relative in
fp32). Greedy decoding stays the model's own except at exact near-ties of the top two logits,
which `dvi bench speed` counts (`identical_to_ar`).
"""

from __future__ import annotations

import functools
import logging

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


class PackedLinear:
    """y = x @ W^T + b for a frozen weight W [N, K] (bias b [N] or None), inference only.

    __call__(x [T, K]) -> [T, N] in W's dtype; x must be 2-D and on W's device. The layouts are
    copies made once here: change W afterwards and this layer does not see it (rebuild it).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self._cpu = weight.device.type == "cpu"
        if self._cpu:
            self._rows_t = weight.t().contiguous()  # [K, N]: the T == 1 layout
            self._packed = (
                torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PREPACK_BATCH_HINT)
                if weight.dtype == torch.float32 and onednn_prepack_available()
                else None
            )
            self._weight = weight if self._packed is None else None
        else:
            self._rows_t = self._packed = None
            self._weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu and x.shape[0] == 1:
            y = torch.mm(x, self._rows_t)
            return y if self.bias is None else y + self.bias
        if self._packed is not None:
            if x.shape[0] == 2:  # see the module docstring: three rows run faster than two
                return torch.ops.mkldnn._linear_pointwise(
                    torch.cat([x, x[:1]]), self._packed, self.bias, "none", [], "")[:2]
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self._weight, self.bias)
