"""Shared numeric assertions: float64 references and the 2x rule for low precision."""

from __future__ import annotations

import torch


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| over positions, treating equal infinities as exact; NaN counts as inf."""
    # Compared on the CPU: a kernel's output may live on the GPU, the float64 reference does not.
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max()) if diff.numel() else 0.0


def assert_no_nan(name: str, t: torch.Tensor) -> None:
    assert not torch.isnan(t).any(), f"{name} has NaN"


def assert_close_fp32(
    name: str, actual: torch.Tensor, expected64: torch.Tensor, rtol=2e-5, atol=2e-5
) -> None:
    """fp32 kernels against the float64 reference: elementwise |a - e| <= atol + rtol·|e|."""
    assert_no_nan(name, actual)
    a, e = actual.detach().double().cpu(), expected64.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: infinities differ from the reference"
    assert torch.equal(a[~finite], e[~finite]), f"{name}: infinite values differ"
    err = (a[finite] - e[finite]).abs()
    bound = atol + rtol * e[finite].abs()
    worst = float((err - bound).max()) if err.numel() else -1.0
    assert worst <= 0, f"{name}: max error {float(err.max()):.3e} exceeds atol={atol} rtol={rtol}"


def assert_within_2x(
    name: str, actual: torch.Tensor, expected64: torch.Tensor, torch_lowp: torch.Tensor, floor: float = 1e-6
) -> None:
    """Low-precision rule: error vs float64 at most 2x the error of torch run in that dtype (+ a floor)."""
    assert_no_nan(name, actual)
    err = max_abs_err(actual, expected64)
    torch_err = max_abs_err(torch_lowp, expected64)
    assert err <= 2 * torch_err + floor, f"{name}: error {err:.3e} > 2 x torch's {torch_err:.3e} (+{floor})"


def interpreter_rounding_floor(backend: str, dtype: torch.dtype, reference: torch.Tensor) -> float:
    """One ulp of ``dtype`` at the reference's largest magnitude when Triton runs interpreted, else 0.

    The interpreter converts fp32 to bf16/fp16 by truncation (compiled Triton rounds to nearest), so a
    low-precision output may sit a whole ulp off there; that is the interpreter, not the kernel.
    """
    import os

    if (
        backend != "triton"
        or os.environ.get("TRITON_INTERPRET") != "1"
        or dtype not in (torch.bfloat16, torch.float16)
    ):
        return 0.0
    top = float(reference.abs().max()) if reference.numel() else 0.0
    if top == 0.0:
        return 0.0
    return torch.finfo(dtype).eps * 2.0 ** torch.floor(torch.log2(torch.tensor(top))).item()
