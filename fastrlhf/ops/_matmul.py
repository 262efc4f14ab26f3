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


# Up to this many rows the packed few-row kernel beats torch.mm against a large CPU weight. [32000, 256]
# fp32, 2-core AMD EPYC (AVX-512), ms per product, packed against torch.mm: 1 row 0.52 / 4.6, 16 rows
# 2.4 / 5.7, 32 rows 3.2 / 7.4, 64 rows 5.8 / 9.1. Packing costs 14 ms, once per decode.
FEW_ROWS_MAX = 64


class FewRowWeight:
    """A linear layer's weight ``[V, H]`` made ready for products with a few rows, for a decoding loop's
    lm_head: ``logits(hidden [B, H])`` is ``hidden @ weight.T`` in float32, ``[B, V]``.

    On the CPU with the compiled core, the weight is packed once (an fp32 copy, ``V x H x 4`` bytes, for
    as long as this object lives), and each call with up to FEW_ROWS_MAX rows streams it once through the
    ``few_row_linear`` kernel. MKL's sgemm repacks the weight on every call: 4.6 ms for 1 row and 5.7 for
    16 against [32000, 256] fp32 on a 2-core EPYC, where the packed kernel takes 0.5 and 2.4 ms.
    Elsewhere, and for more rows, ``torch.mm``. The same product either way, up to fp32 rounding. The
    weight must not change while the object is in use.
    """

    def __init__(self, weight: torch.Tensor):
        from fastrlhf._extension import extension

        self.weight = weight
        self.module = extension()
        self.packed = None
        if (
            self.module is not None
            and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
        ):
            self.packed = self.module.few_row_linear_pack(weight.detach().contiguous())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and hidden.shape[0] <= FEW_ROWS_MAX:
            hidden = hidden.detach().float().contiguous()
            return self.module.few_row_linear_forward(hidden, self.packed, self.weight.shape[0])
        return torch.mm(self.weight, hidden.to(self.weight.dtype).t()).t().float()
