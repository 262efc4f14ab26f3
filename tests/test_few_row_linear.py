"""The few-row lm_head product of CPU decoding (``ops._matmul.FewRowWeight`` and its packed C++ kernel)
against a float64 product of the same inputs: odd shapes, every tile and panel edge, 16-bit weights,
extreme values."""

from __future__ import annotations

import pytest
import torch

from fastrlhf._extension import extension
from fastrlhf.ops._matmul import FEW_ROWS_MAX, FewRowWeight

needs_compiled = pytest.mark.skipif(extension() is None, reason="needs the compiled core fastrlhf._C")


def dot_error_bound(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|fl(h·w) - h·w| <= γ_n Σ|h_k w_k| with γ_n ≈ n·u for fp32 accumulation of n products."""
    n = hidden.shape[1]
    magnitude = hidden.double().abs() @ weight.double().abs().T
    return 2 * n * torch.finfo(torch.float32).eps * magnitude + 1e-30


@needs_compiled
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, FEW_ROWS_MAX])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(1, 1), (3, 7), (31, 5), (33, 16), (257, 37), (1001, 256), (512, 300)]
)
def test_matches_the_float64_product(rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features + in_features)
    hidden = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    got = FewRowWeight(weight).logits(hidden)
    want = hidden.double() @ weight.double().T
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert torch.all((got.double() - want).abs() <= dot_error_bound(hidden, weight))


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_accumulate_in_fp32(dtype):
    """The weight is read in its own dtype and widened: the result is the fp32-accumulated product of the
    rounded weight, not a 16-bit one."""
    torch.manual_seed(5)
    hidden = torch.randn(6, 96)
    weight = (torch.randn(333, 96) / 10).to(dtype)
    got = FewRowWeight(weight).logits(hidden)
    want = hidden.double() @ weight.double().T
    assert got.dtype == torch.float32
    assert torch.all((got.double() - want).abs() <= dot_error_bound(hidden, weight.float()))


@needs_compiled
def test_extreme_values_and_non_finite_inputs_propagate():
    torch.manual_seed(6)
    hidden = torch.randn(5, 40) * 1e4
    weight = torch.randn(70, 40) * 1e3
    hidden[1, 3] = float("nan")
    hidden[2, 0] = float("inf")
    got = FewRowWeight(weight).logits(hidden)
    want = hidden.double() @ weight.double().T
    finite_rows = [0, 3, 4]
    assert torch.all(
        (got[finite_rows].double() - want[finite_rows]).abs() <= dot_error_bound(hidden[finite_rows], weight)
    )
    assert torch.isnan(got[1]).all()
    assert torch.equal(torch.isinf(got[2]), torch.isinf(want[2]))


def test_many_rows_and_the_fallback_give_the_same_product():
    """Past FEW_ROWS_MAX rows (and off the CPU kernel) the product is torch.mm's, still fp32."""
    torch.manual_seed(7)
    hidden = torch.randn(FEW_ROWS_MAX + 3, 64)
    weight = torch.randn(129, 64)
    got = FewRowWeight(weight).logits(hidden)
    torch.testing.assert_close(got, hidden @ weight.T, rtol=1e-5, atol=1e-5)
    assert FewRowWeight(weight.double()).logits(hidden[:2]).dtype == torch.float32


@needs_compiled
def test_bad_arguments_are_refused():
    module = extension()
    packed = module.few_row_linear_pack(torch.randn(40, 6))
    assert packed.shape == (2, 6, 32)
    assert torch.all(packed[1, :, 8:] == 0), "the columns past the weight's rows are zero"
    with pytest.raises(RuntimeError, match="packed must be"):
        module.few_row_linear_forward(torch.randn(2, 5), packed, 40)
    with pytest.raises(RuntimeError, match="packed must be"):
        module.few_row_linear_forward(torch.randn(2, 6), packed, 70)
    with pytest.raises(RuntimeError, match="float32"):
        module.few_row_linear_forward(torch.randn(2, 6).double(), packed, 40)
    with pytest.raises(RuntimeError, match="2-D"):
        module.few_row_linear_pack(torch.randn(4))
    assert module.few_row_linear_forward(torch.randn(0, 6), packed, 40).shape == (0, 40)
