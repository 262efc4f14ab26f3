"""kl_penalty on every backend, on the CPU and (when one is present) the GPU, against the float64 reference
on the CPU: values, both gradients, reductions."""

import math

import pytest
import torch
from conftest import DispatchedOps, on_device, op_targets, triton_targets
from numerics import assert_close_fp32, assert_within_2x, interpreter_rounding_floor

from fastrlhf.ops import kl_penalty, reference

ESTIMATORS = ["k1", "k2", "k3", "abs"]


def run(backend, device, logp, ref, mask, estimator, clamp=None, reduction="none"):
    """The op on ``device`` under a random upstream gradient ``g``: (kl, d logp, d ref, g), on the CPU."""
    a, b, on_mask = on_device(device, logp.detach(), ref.detach(), mask)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    out = kl_penalty(a, b, on_mask, estimator, clamp, reduction=reduction, backend=backend)
    g = torch.randn_like(out, dtype=torch.float32) if out.dim() else torch.tensor(1.0, device=device)
    (out * g).sum().backward()
    return out.detach().cpu(), a.grad.cpu(), b.grad.cpu(), g.cpu()


def reference64(logp, ref, mask, estimator, clamp, g, reduction="none"):
    a = logp.detach().double().requires_grad_(True)
    b = ref.detach().double().requires_grad_(True)
    kl = reference.kl_penalty(a, b, mask, estimator, clamp)
    if reduction != "none":
        w = torch.ones_like(kl) if mask is None else mask.double()
        kl = (
            (kl * w).sum(-1) / w.sum(-1).clamp_min(1) if reduction == "seq-mean" else (kl * w).sum() / w.sum()
        )
    (kl * g.double()).sum().backward()
    return kl.detach(), a.grad, b.grad


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 1031)])
def test_matches_reference_with_mask(backend, device, estimator, shape):
    logp, ref = -torch.rand(shape) * 5, -torch.rand(shape) * 5
    mask = torch.rand(shape) > 0.3
    kl, da, db, g = run(backend, device, logp, ref, mask, estimator)
    want, wa, wb = reference64(logp, ref, mask, estimator, None, g)
    assert kl.dtype == torch.float32 and kl.shape == shape
    assert_close_fp32("kl", kl, want)
    assert_close_fp32("d logprobs", da, wa)
    assert_close_fp32("d ref_logprobs", db, wb)
    assert torch.all(kl[~mask] == 0) and torch.all(da[~mask] == 0)


@pytest.mark.parametrize("backend,device", op_targets(include_torch=False))
def test_large_flat_input(backend, device):
    n = 4099 if backend == "triton" and device == "cpu" else 1_000_003  # the interpreter is slow
    logp, ref = -torch.rand(n) * 8, -torch.rand(n) * 8
    kl, da, _, g = run(backend, device, logp, ref, None, "k3")
    want, wa, _ = reference64(logp, ref, None, "k3", None, g)
    assert_close_fp32("kl", kl, want)
    assert_close_fp32("d logprobs", da, wa)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("gap", [50.0, -50.0, 1e-4, -1e-4, 0.0])
def test_k3_finite_nonnegative_and_accurate_at_extreme_and_tiny_gaps(backend, device, gap):
    ref = -torch.rand(64) * 3
    logp = ref + gap
    kl, da, _, g = run(backend, device, logp, ref, None, "k3")
    want, wa, _ = reference64(logp, ref, None, "k3", None, g)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert torch.isfinite(da).all()
    # At tiny gaps k3 ≈ d²/2 is a difference of near-equal terms: allow fp32 rounding of d itself.
    assert_close_fp32("kl", kl, want, rtol=1e-4, atol=1e-7 * abs(gap) + 1e-12)
    # d k3 / d logp = 1 - exp(-d): eager torch forms it with ~6e-8 of cancellation at tiny d; the kernels
    # use -expm1(-d) and do far better, but the bound is the eager one.
    assert_close_fp32("d logprobs", da, wa, rtol=1e-4, atol=2e-7 * float(g.abs().max()))


def k3_gap_sweep() -> torch.Tensor:
    """Gaps d = logp - ref from 1e-8 to the edge of fp32's exponent range, both signs: a dense grid, the
    boundaries of the kernels' range reduction (|d| = (k + 1/2)·ln 2, where the exponent k changes) and
    the fp32 numbers either side of each, the edges of the CPU kernel's fast range (d = 87, -88), and
    gaps past it on the side where k3 stays finite (d up to +inf: ref = -inf)."""
    halves = torch.tensor([(k + 0.5) * math.log(2) for k in range(127)], dtype=torch.float32)
    near = torch.cat([halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    magnitudes = torch.cat([torch.linspace(0, 88.5, 4001), torch.logspace(-8, 0, 200), near])
    past = torch.tensor([87.0, 88.0, 88.5, 100.0, 1e4, 1e30, float("inf")])
    return torch.cat([magnitudes, -magnitudes[magnitudes <= 88.5], past])


@pytest.mark.parametrize("backend,device", op_targets(include_torch=False))
def test_k3_relative_accuracy_across_the_exponent_range(backend, device):
    """k3 and d k3 / d logp within 1e-6 relative of float64 at every gap: ref = 0 makes the gap exact, so the
    error is the kernel's own (the fp32 torch form loses everything to cancellation at tiny gaps)."""
    gaps = k3_gap_sweep()
    logp = torch.where(torch.isinf(gaps), torch.zeros_like(gaps), gaps)
    ref = torch.where(torch.isinf(gaps), torch.full_like(gaps, -math.inf), torch.zeros_like(gaps))
    a, b = on_device(device, logp.clone(), ref)
    a.requires_grad_(True)
    kl = kl_penalty(a, b, None, "k3", backend=backend)
    kl.sum().backward()
    a64 = logp.double().requires_grad_(True)
    want = reference.kl_penalty(a64, ref.double(), None, "k3", None)
    want.sum().backward()
    assert_close_fp32("kl", kl.detach().cpu(), want.detach(), rtol=1e-6, atol=0)
    assert_close_fp32("d logprobs", a.grad.cpu(), a64.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_clamp_bounds_values_and_stops_gradient(backend, device, estimator):
    logp, ref = torch.randn(4, 33) * 3, torch.randn(4, 33) * 3
    kl, da, db, g = run(backend, device, logp, ref, None, estimator, clamp=1.5)
    want, wa, wb = reference64(logp, ref, None, estimator, 1.5, g)
    assert kl.abs().max() <= 1.5
    assert_close_fp32("kl", kl, want)
    assert_close_fp32("d logprobs", da, wa)
    assert_close_fp32("d ref_logprobs", db, wb)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamp", [10.0, 100.0])  # 100: even the capped gap's exp overflows float32
def test_clamped_k3_has_zero_not_nan_gradient_where_exp_overflows(backend, device, dtype, clamp):
    """Gaps past exp's range (and a -inf log-prob) are clamped: the value is the clamp, the gradient 0."""
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 runs on the torch backend")
    logp = torch.tensor([[-1000.0, -200.0, float("-inf"), -1.0, 0.5]], dtype=dtype, device=device)
    logp.requires_grad_(True)
    ref = torch.zeros(1, 5, dtype=dtype, device=device, requires_grad=True)
    kl = kl_penalty(logp, ref, estimator="k3", clamp=clamp, backend=backend)
    kl.sum().backward()
    assert kl[0, :3].tolist() == [clamp, clamp, clamp]
    assert logp.grad[0, :3].tolist() == [0.0, 0.0, 0.0] and ref.grad[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(logp.grad).all() and torch.isfinite(ref.grad).all()


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("reduction", ["seq-mean", "token-mean"])
def test_reductions(backend, device, reduction):
    logp, ref = -torch.rand(4, 9) * 4, -torch.rand(4, 9) * 4
    mask = torch.rand(4, 9) > 0.4
    mask[2] = False  # an empty sequence: mean 0, not NaN
    kl, da, db, g = run(backend, device, logp, ref, mask, "k2", reduction=reduction)
    want, wa, wb = reference64(logp, ref, mask, "k2", None, g, reduction)
    assert_close_fp32("kl", kl, want)
    assert_close_fp32("d logprobs", da, wa)
    assert_close_fp32("d ref_logprobs", db, wb)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_low_precision_within_2x_of_torch(backend, device, dtype, estimator):
    logp, ref = (-torch.rand(6, 257) * 6).to(dtype), (-torch.rand(6, 257) * 6).to(dtype)
    mask = torch.rand(6, 257) > 0.2
    kl, da, db, g = run(backend, device, logp, ref, mask, estimator)
    want, wa, wb = reference64(logp, ref, mask, estimator, None, g)
    # torch run in the low dtype: the same formulas, no upcast.
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    d = a - b
    lowp = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator] * mask
    (lowp * g.to(dtype)).sum().backward()
    assert da.dtype == dtype and db.dtype == dtype
    assert_within_2x("kl", kl, want, lowp.detach())
    floor = 1e-6 + interpreter_rounding_floor(backend, dtype, wa)
    assert_within_2x("d logprobs", da, wa, a.grad, floor=floor)
    assert_within_2x("d ref_logprobs", db, wb, b.grad, floor=floor)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("reduction", ["none", "seq-mean", "token-mean"])
def test_frozen_reference_and_repeated_backward(backend, device, reduction):
    """A frozen reference (as in a trainer) gets no gradient; the policy's is right for a per-token, per-row
    or scalar upstream gradient, and the same again from a second backward through the retained graph."""
    logp, ref = -torch.rand(5, 67) * 4, -torch.rand(5, 67) * 4
    mask = torch.rand(5, 67) > 0.3
    a, b, on_mask = on_device(device, logp.clone(), ref.clone(), mask)
    a.requires_grad_(True)
    out = kl_penalty(a, b, on_mask, "k3", reduction=reduction, backend=backend)
    g = torch.randn(out.shape, device=device)
    (out * g).sum().backward(retain_graph=True)
    first = a.grad.clone()
    a.grad = None
    (out * g).sum().backward()
    want, wa, _ = reference64(logp, ref, mask, "k3", None, g.cpu(), reduction)
    assert b.grad is None
    assert_close_fp32("kl", out.detach().cpu(), want)
    assert_close_fp32("d logprobs", first.cpu(), wa)
    assert torch.equal(a.grad, first)


@pytest.mark.parametrize("backend,device", triton_targets())
@pytest.mark.parametrize("rows", [None, 3, 7])
def test_triton_mean_kernels_over_many_segments_and_loop_steps(backend, device, rows):
    """The Triton means over token-mean segments and row loops several steps long (small ``segment`` and
    ``block`` put a few hundred tokens through every path), with a mask leaving one row empty and -inf
    padding under it: the means, the normalizers and both gradients against float64."""
    from fastrlhf.ops.triton import kl_penalty as kernels

    n = 21 * 29  # whole rows of 203 or 87 tokens, and 10 token-mean segments of 64
    logp, ref = -torch.rand(n) * 5, -torch.rand(n) * 5
    mask = torch.rand(n) > 0.3
    if rows is not None:
        mask[: n // rows] = False  # a row with no kept token: mean 0, normalizer 1
    # Padding the mask drops may hold -inf log-probs: their NaN estimate must not reach a sum or a gradient.
    padded = torch.where(~mask & (torch.arange(n) % 5 == 0), torch.tensor(-math.inf), logp)
    a, b, m = on_device(device, padded, ref, mask.to(torch.uint8))
    mean, normalizer = kernels.kl_penalty_mean(a, b, m, kernels.K3, math.inf, rows, block=16, segment=64)
    g = torch.randn(rows) if rows is not None else torch.tensor(0.7)
    d_logp, d_ref = kernels.kl_penalty_backward(
        g.to(device), a, b, m, kernels.K3, math.inf, normalizer=normalizer, rows=rows, ref_grad=True, block=16
    )

    shape = (rows, n // rows) if rows is not None else (n,)
    want, want_d_logp, want_d_ref = reference64(
        logp.view(shape),
        ref.view(shape),
        mask.view(shape),
        "k3",
        None,
        g,
        "seq-mean" if rows else "token-mean",
    )
    kept = mask.view(shape).sum(-1) if rows is not None else mask.sum()
    assert_close_fp32("mean", mean.cpu(), want)
    assert torch.equal(normalizer.cpu(), kept.clamp_min(1).float())
    assert_close_fp32("d logprobs", d_logp.cpu().view(shape), want_d_logp)
    assert_close_fp32("d ref_logprobs", d_ref.cpu().view(shape), want_d_ref)


@pytest.mark.parametrize("backend,device", triton_targets())
@pytest.mark.parametrize("reduction", ["none", "seq-mean", "token-mean"])
def test_triton_path_reduces_and_differentiates_in_its_kernels(backend, device, reduction):
    """Forward and backward of the Triton path run no torch arithmetic: the mean, the division by the
    normalizer, the negation for the reference's gradient and the scalar upstream gradient of ``.sum()``
    (read once, not expanded into a tensor) are all in the kernels. Values and gradients against float64."""
    logp, ref = -torch.rand(4, 37) * 3, -torch.rand(4, 37) * 3
    mask = torch.rand(4, 37) > 0.3
    a, b, m = on_device(device, logp.clone(), ref.clone(), mask)
    a.requires_grad_(True), b.requires_grad_(True)
    with DispatchedOps() as forward_ops:
        out = kl_penalty(a, b, m, "k3", reduction=reduction, backend=backend)
    total = out.sum()
    with DispatchedOps() as backward_ops:
        total.backward()
    arithmetic = {
        "add",
        "sub",
        "mul",
        "div",
        "neg",
        "sum",
        "mean",
        "clamp_min",
        "where",
        "masked_fill",
        "clone",
    }
    arithmetic |= {"_to_copy", "zeros", "fill_", "zero_"}
    assert not forward_ops.names & arithmetic, sorted(forward_ops.names)
    # ones_like and expand are the engine's seed and sum's backward: views and a scalar, not a pass.
    assert not backward_ops.names & arithmetic, sorted(backward_ops.names)
    want, want_a, want_b = reference64(logp, ref, mask, "k3", None, torch.ones(out.shape), reduction)
    assert_close_fp32("kl", out.detach().cpu(), want)
    assert_close_fp32("d logprobs", a.grad.cpu(), want_a)
    assert_close_fp32("d ref_logprobs", b.grad.cpu(), want_b)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 0, 4)])
def test_means_of_empty_inputs(backend, device, shape):
    """No token: a seq-mean of rows that have none is 0 per row, a token-mean is 0, and the gradients are
    empty, on every backend."""
    for reduction, want_shape in (("seq-mean", shape[:-1]), ("token-mean", ())):
        a, b = on_device(device, torch.zeros(shape), torch.zeros(shape))
        a.requires_grad_(True)
        out = kl_penalty(a, b, None, "k3", reduction=reduction, backend=backend)
        assert out.shape == want_shape and out.dtype == torch.float32
        assert torch.equal(out.detach().cpu(), torch.zeros(want_shape))
        out.sum().backward()
        assert a.grad.shape == shape and a.grad.dtype == torch.float32


def test_gradcheck_reference_path_float64():
    logp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    for est in ESTIMATORS[:3]:
        assert torch.autograd.gradcheck(
            lambda a, b, e=est: kl_penalty(a, b, mask, e, reduction="seq-mean"), (logp, ref)
        )


def test_validation():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="estimator='k4' is not one of"):
        kl_penalty(x, x, estimator="k4")
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3, 2\) but logprobs has \(2, 3\)"):
        kl_penalty(x, x.T)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        kl_penalty(x, x, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="clamp must be None or a positive number"):
        kl_penalty(x, x, clamp=-1.0)
    with pytest.raises(ValueError, match="reduction='sum' is not one of"):
        kl_penalty(x, x, reduction="sum")
    with pytest.raises(ValueError, match="logprobs has dtype int64"):
        kl_penalty(torch.zeros(2, 3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="one device"):
        kl_penalty(x, x.to("meta"))
