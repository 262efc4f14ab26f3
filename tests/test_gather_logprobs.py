"""gather_logprobs on every backend against the float64 reference: values, entropy, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends, gpu_backends
from numerics import assert_close_fp32, assert_no_nan, assert_within_2x, interpreter_rounding_floor

from fastrlhf.ops import gather_logprobs, reference

LOWP = [torch.bfloat16, torch.float16]


def make_case(rows, vocab, dtype=torch.float32, scale=3.0, ignore_frac=0.2, ignore_index=-100, lead=None):
    """Fresh random logits/labels from the per-test seed (see conftest.fresh_seed)."""
    shape = (rows,) if lead is None else lead
    logits = (torch.randn(*shape, vocab) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape)
    if ignore_frac:
        drop = torch.rand(shape) < ignore_frac
        labels[drop] = ignore_index
    return logits, labels


def reference64(logits, labels, temperature=1.0, ignore_index=-100, grad_lp=None, grad_ent=None):
    """Values and d(logits) in float64 from the reference, for the loss Σ g·logp + Σ h·entropy."""
    x = logits.detach().double().requires_grad_(True)
    lp, ent = reference.gather_logprobs(x, labels, temperature, ignore_index, return_entropy=True)
    loss = 0
    if grad_lp is not None:
        loss = loss + (lp * grad_lp.double()).sum()
    if grad_ent is not None:
        loss = loss + (ent * grad_ent.double()).sum()
    grad = torch.autograd.grad(loss, x)[0] if torch.is_tensor(loss) and x.numel() else torch.zeros_like(x)
    return lp.detach(), ent.detach(), grad


def run_backend(
    backend, logits, labels, temperature=1.0, ignore_index=-100, grad_lp=None, grad_ent=None, inplace=False
):
    x = logits.detach().clone().requires_grad_(True)
    want_entropy = grad_ent is not None
    out = gather_logprobs(x, labels, temperature, ignore_index, return_entropy=want_entropy, backend=backend)
    lp, ent = out if want_entropy else (out, None)
    loss = (lp * grad_lp).sum() + ((ent * grad_ent).sum() if want_entropy else 0)
    if x.numel():
        loss.backward()
        grad = x.grad
    else:
        grad = torch.zeros_like(x)
    return lp.detach(), None if ent is None else ent.detach(), grad


# --------------------------------------------------------------------------------- fp32, shapes


SHAPES_SMALL = [(1, 1), (3, 7), (17, 1000), (5, 5003), (0, 7), (1, 4099)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("rows,vocab", SHAPES_SMALL)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fp32_matches_float64_reference(backend, rows, vocab, with_entropy):
    logits, labels = make_case(rows, vocab)
    g = torch.randn(rows)
    h = torch.randn(rows) if with_entropy else None
    lp, ent, grad = run_backend(backend, logits, labels, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, grad_lp=g, grad_ent=h)
    assert lp.dtype == torch.float32
    assert_close_fp32("logprobs", lp, ref_lp)
    if with_entropy:
        assert_close_fp32("entropy", ent, ref_ent)
    assert grad.dtype == logits.dtype
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-6)
    ignored = labels == -100
    assert torch.all(lp[ignored] == 0)
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
@pytest.mark.parametrize("vocab", [50257, 151936])
def test_large_vocab_cpp(backend, vocab):
    if backend == "triton":
        pytest.skip("the Triton interpreter is too slow for large vocabularies; covered on GPU")
    rows = 9
    logits, labels = make_case(rows, vocab, scale=5.0)
    g, h = torch.randn(rows), torch.randn(rows)
    lp, ent, grad = run_backend(backend, logits, labels, temperature=0.8, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, 0.8, grad_lp=g, grad_ent=h)
    assert_close_fp32("logprobs", lp, ref_lp, rtol=1e-5, atol=5e-5)
    assert_close_fp32("entropy", ent, ref_ent, rtol=1e-5, atol=5e-5)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_many_rows_realistic_size(backend):
    """Enough rows to split across threads, at a realistic vocabulary (the C++ kernel's main shape)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is too slow at this size; covered on GPU")
    logits, labels = make_case(513, 32003)
    g = torch.randn(513)
    lp, _, grad = run_backend(backend, logits, labels, grad_lp=g)
    ref_lp, _, ref_grad = reference64(logits, labels, grad_lp=g)
    assert_close_fp32("logprobs", lp, ref_lp, atol=5e-5)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
def test_three_d_inputs_and_temperature(backend):
    logits, labels = make_case(None, 301, lead=(2, 5))
    g = torch.randn(2, 5)
    h = torch.randn(2, 5)
    lp, ent, grad = run_backend(backend, logits, labels, temperature=0.7, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, 0.7, grad_lp=g, grad_ent=h)
    assert lp.shape == (2, 5) and ent.shape == (2, 5)
    assert_close_fp32("logprobs", lp, ref_lp)
    assert_close_fp32("entropy", ent, ref_ent)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_ignore_index_and_all_ignored(backend):
    logits, labels = make_case(6, 50, ignore_frac=0.5, ignore_index=7)
    labels[labels == 7] = -1  # ignore_index is -1 here; real label 7 stays a real label
    labels[0] = 7
    g = torch.randn(6)
    lp, _, grad = run_backend(backend, logits, labels, ignore_index=-1, grad_lp=g)
    ref_lp, _, ref_grad = reference64(logits, labels, ignore_index=-1, grad_lp=g)
    assert_close_fp32("logprobs", lp, ref_lp)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-6)
    all_ignored = torch.full((4,), -100)
    lp, _, grad = run_backend(backend, logits[:4], all_ignored, grad_lp=torch.ones(4))
    assert torch.all(lp == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_inputs(backend):
    wide = torch.randn(7, 400)
    logits = wide[:, 3:300]  # row stride 400, last-dim stride 1
    labels_wide = torch.randint(0, 297, (7, 2))
    labels = labels_wide[:, 0]  # stride 2
    g = torch.randn(7)
    lp, _, grad = run_backend(backend, logits, labels, grad_lp=g)
    ref_lp, _, ref_grad = reference64(logits, labels, grad_lp=g)
    assert_close_fp32("logprobs", lp, ref_lp)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-6)
    transposed = torch.randn(297, 7).T  # last-dim stride 7: copied to rows first
    lp, _, grad = run_backend(backend, transposed, labels, grad_lp=g)
    ref_lp, _, ref_grad = reference64(transposed, labels, grad_lp=g)
    assert_close_fp32("logprobs (transposed)", lp, ref_lp)
    assert_close_fp32("grad (transposed)", grad, ref_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------- extreme values


@pytest.mark.parametrize("backend", cpu_backends())
def test_minus_inf_logits(backend):
    """Masked vocabulary entries (-inf): finite results, -inf only for a label on a masked entry."""
    rows, vocab = 6, 777
    logits, labels = make_case(rows, vocab, ignore_frac=0.0)
    logits[:, ::3] = float("-inf")  # a third of the vocabulary masked out
    logits[1, :-1] = float("-inf")  # a row with a single finite logit
    labels[0] = 3  # label on a masked entry → logprob -inf
    labels[1] = vocab - 1
    labels[2:] = torch.randint(0, vocab // 3, (rows - 2,)) * 3 + 1  # finite entries
    g = torch.randn(rows)
    g[0] = 0.0  # the -inf row gets no upstream gradient (as it would under a mask)
    h = torch.randn(rows)
    lp, ent, grad = run_backend(backend, logits, labels, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, grad_lp=g, grad_ent=h)
    assert lp[0] == float("-inf")
    assert lp[1] == 0.0 and ent[1] == 0.0
    assert_close_fp32("logprobs", lp, ref_lp)
    assert_close_fp32("entropy", ent, ref_ent)
    assert_no_nan("grad", grad)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-6)


def assert_nan_logit_rows(backend, device):
    """A NaN logit spreads to its row's log-prob, entropy and gradient, as in torch's log_softmax, whether
    it sits in a SIMD step or in a row's scalar tail and whatever the label; the other rows are exact.
    (The kernels' clamps must keep a NaN: a plain max(t, floor) turns it into the floor, a silent -inf.)"""
    rows, vocab = 5, 4099  # 4099 = whole 8- and 16-float steps plus a 3-element tail
    logits, labels = make_case(rows, vocab, ignore_frac=0.0)
    logits[0, 100] = float("nan")  # inside a SIMD step, not the label
    logits[1, vocab - 2] = float("nan")  # in the tail
    labels[2] = 7
    logits[2, 7] = float("nan")  # the label itself
    g, h = torch.randn(rows), torch.randn(rows)
    lp, ent, grad = run_backend(
        backend, logits.to(device), labels.to(device), grad_lp=g.to(device), grad_ent=h.to(device)
    )
    lp, ent, grad = lp.cpu(), ent.cpu(), grad.cpu()
    torch_lp = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    for row in range(3):
        assert torch.isnan(torch_lp[row]), "torch itself gives NaN here"
        assert torch.isnan(lp[row]), f"row {row}: logprob {lp[row].item()} instead of NaN"
        assert torch.isnan(ent[row]), f"row {row}: entropy {ent[row].item()} instead of NaN"
        assert torch.isnan(grad[row]).any(), f"row {row}: a finite gradient from a NaN logit"
    ref_lp, ref_ent, ref_grad = reference64(logits[3:], labels[3:], grad_lp=g[3:], grad_ent=h[3:])
    assert_close_fp32("logprobs", lp[3:], ref_lp)
    assert_close_fp32("entropy", ent[3:], ref_ent)
    assert_close_fp32("grad", grad[3:], ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_nan_logit_makes_its_row_nan(backend):
    assert_nan_logit_rows(backend, "cpu")


@pytest.mark.parametrize("backend", gpu_backends())
def test_a_nan_logit_makes_its_row_nan_on_gpu(backend):
    assert_nan_logit_rows(backend, "cuda")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_huge_logits(backend, magnitude):
    rows, vocab = 4, 1031
    logits, labels = make_case(rows, vocab, ignore_frac=0.0)
    logits[:, 10] = magnitude
    logits[2] = magnitude  # an all-equal row at ±1e4: uniform distribution
    labels[1] = 10
    g, h = torch.randn(rows), torch.randn(rows)
    lp, ent, grad = run_backend(backend, logits, labels, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, grad_lp=g, grad_ent=h)
    # 1e4-sized logits carry ~1e-3 of fp32 rounding before any kernel runs; scale the tolerance to it.
    assert_close_fp32("logprobs", lp, ref_lp, rtol=1e-5, atol=2e-3)
    assert_close_fp32("entropy", ent, ref_ent, rtol=1e-5, atol=2e-3)
    assert_close_fp32("grad", grad, ref_grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- bf16 / fp16


def torch_in_dtype(logits, labels, temperature, g, h):
    """Eager torch run entirely in the low-precision dtype: the baseline of the 2x rule."""
    x = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(x / temperature, -1)
    valid = labels != -100
    lp = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    probs = logp.exp()
    ent = -(probs * logp).sum(-1) * valid
    ((lp * g.to(lp.dtype)).sum() + (ent * h.to(ent.dtype)).sum()).backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("backend", cpu_backends(include_torch=True))
@pytest.mark.parametrize("dtype", LOWP, ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows,vocab", [(5, 7), (13, 3001)])
def test_low_precision_within_2x_of_torch(backend, dtype, rows, vocab):
    logits, labels = make_case(rows, vocab, dtype=dtype, scale=4.0)
    g, h = torch.randn(rows), torch.randn(rows)
    lp, ent, grad = run_backend(backend, logits, labels, temperature=0.9, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, 0.9, grad_lp=g, grad_ent=h)
    t_lp, t_ent, t_grad = torch_in_dtype(logits, labels, 0.9, g, h)
    assert lp.dtype == torch.float32 and grad.dtype == dtype
    assert_within_2x("logprobs", lp, ref_lp, t_lp)
    assert_within_2x("entropy", ent, ref_ent, t_ent)
    assert_within_2x(
        "grad", grad, ref_grad, t_grad, floor=1e-6 + interpreter_rounding_floor(backend, dtype, ref_grad)
    )


# --------------------------------------------------------------------------------- in-place backward


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_writes_into_logits(backend, dtype):
    rows, vocab, hidden = 9, 501, 16
    h_states = torch.randn(rows, hidden, dtype=dtype)
    weight = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    g = torch.randn(rows)

    logits = h_states @ weight.T
    lp = gather_logprobs(logits, labels, inplace_backward=True, backend=backend)
    (lp * g).sum().backward()
    inplace_grad_w = weight.grad.clone()
    # The logits buffer now holds d(loss)/d(logits).
    ref_lp, _, ref_dlogits = reference64((h_states @ weight.T).detach(), labels, grad_lp=g)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert_close_fp32("logits buffer = dlogits", logits.detach(), ref_dlogits, **tol)

    weight.grad = None
    logits = h_states @ weight.T
    (gather_logprobs(logits, labels, backend=backend) * g).sum().backward()
    torch.testing.assert_close(inplace_grad_w, weight.grad)


# --------------------------------------------------------------------------------- gradcheck


def test_reference_gradcheck_float64():
    logits, labels = make_case(4, 9, dtype=torch.float64)
    logits.requires_grad_(True)
    for temperature in (1.0, 0.6):
        assert torch.autograd.gradcheck(
            lambda x, t=temperature: reference.gather_logprobs(x, labels, t, return_entropy=True), (logits,)
        )


def test_auto_backend_on_float64_is_gradcheckable():
    logits, labels = make_case(3, 11, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, labels, 0.5, return_entropy=True), (logits,))


# --------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,vocab", [(1, 151936), (4096, 32000), (3, 7), (0, 11)])
def test_gpu_matches_reference(backend, dtype, rows, vocab):
    logits, labels = make_case(rows, vocab, dtype=dtype)
    logits, labels = logits.cuda(), labels.cuda()
    g, h = torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")
    lp, ent, grad = run_backend(backend, logits, labels, temperature=0.9, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(
        logits.cpu(), labels.cpu(), 0.9, grad_lp=g.cpu(), grad_ent=h.cpu()
    )
    if dtype == torch.float32:
        assert_close_fp32("logprobs", lp.cpu(), ref_lp, atol=5e-5)
        assert_close_fp32("entropy", ent.cpu(), ref_ent, atol=5e-5)
        assert_close_fp32("grad", grad.cpu(), ref_grad, rtol=1e-4, atol=1e-7)
    else:
        t_lp, t_ent, t_grad = torch_in_dtype(logits, labels, 0.9, g, h)
        assert_within_2x("logprobs", lp.cpu(), ref_lp, t_lp.cpu())
        assert_within_2x("entropy", ent.cpu(), ref_ent, t_ent.cpu())
        assert_within_2x("grad", grad.cpu(), ref_grad, t_grad.cpu())


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("offset", [1e4, -1e4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_offset_logits_within_2x_of_torch_fp32(backend, offset, temperature):
    """Logits near ±1e4 with a spread: every p depends on the saved softmax statistics, so an fp32 lse
    (~1e-3 of rounding at 1e4) would show. Errors must stay within 2x of torch's own fp32 errors."""
    rows, vocab = 6, 1000
    logits = offset + 3.0 * torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    g, h = torch.randn(rows), torch.randn(rows)
    lp, ent, grad = run_backend(backend, logits, labels, temperature=temperature, grad_lp=g, grad_ent=h)
    ref_lp, ref_ent, ref_grad = reference64(logits, labels, temperature, grad_lp=g, grad_ent=h)
    x = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x / temperature, -1)
    t_lp = logp.gather(-1, labels[:, None])[:, 0]
    t_ent = -(logp.exp() * logp).sum(-1)
    ((t_lp * g).sum() + (t_ent * h).sum()).backward()
    assert_within_2x("logprobs", lp, ref_lp, t_lp.detach(), floor=1e-6)
    assert_within_2x("entropy", ent, ref_ent, t_ent.detach(), floor=1e-6)
    assert_within_2x("grad", grad, ref_grad, x.grad, floor=1e-6)
