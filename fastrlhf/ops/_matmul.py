"""Matrix products that accumulate and return float32 whatever the input dtype.

The chunked hidden × lm_head ops need fp32 logits and fp32 gradient sums from bf16/fp16 weights:
rounding every chunk's product to bf16 would bias the log-softmax and the accumulated weight gradient.
Where torch has a low-precision GEMM with an fp32 output (``torch.mm(..., out_dtype=torch.float32)``,
CUDA) we use it: tensor-core speed, fp32 accumulate, fp32 result, no fp32 copy of the weight.
Elsewhere (CPU, older torch) the operands are widened to fp32 first; ``Fp32Operand`` does that once
per weight, not once per chunk.
"""

from __future__ import annotations

import functools

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.cache
def has_fp32_out_gemm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on this device."""
    if dtype not in LOW_PRECISION:
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        out = torch.mm(a, a, out_dtype=torch.float32)
        return out.dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


class Fp32Operand:
    """A matrix ready to be multiplied with an fp32 result.

    ``tensor`` is the original when it is fp32 or the device has an fp32-output GEMM for its dtype,
    else an fp32 copy made once. ``gemm_dtype`` is the dtype the other operand must be given in.
    """

    def __init__(self, tensor: torch.Tensor):
        if tensor.dtype == torch.float32 or tensor.dtype == torch.float64:
            self.tensor, self.native = tensor, False
        elif has_fp32_out_gemm(tensor.device.type, tensor.dtype):
            self.tensor, self.native = tensor, True
        else:
            self.tensor, self.native = tensor.float(), False
        self.gemm_dtype = self.tensor.dtype

    def cast(self, other: torch.Tensor) -> torch.Tensor:
        """``other`` in the dtype the product needs (a no-op for fp32 against fp32)."""
        return other if other.dtype == self.gemm_dtype else other.to(self.gemm_dtype)


def mm_fp32(a: torch.Tensor, b: torch.Tensor, native: bool) -> torch.Tensor:
    """``a @ b`` in float32 (float64 stays float64). ``native``: a and b share a low-precision dtype
    that has an fp32-output GEMM here; otherwise both are already fp32/fp64."""
    if native:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b)


def addmm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, native: bool) -> None:
    """``out += a @ b`` with ``out`` float32 (float64 for float64 inputs)."""
    if native:
        out.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:
        out.addmm_(a, b)
