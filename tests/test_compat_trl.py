"""fastrlhf.compat.trl against the installed TRL's own functions: values, gradients, masks, top-K, patch().

The peer here is the real ``trl.trainer.utils`` (its CPU path; run in float64 it is the reference).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from numerics import assert_close_fp32, assert_no_nan, assert_within_2x, max_abs_err

from fastrlhf.compat import trl as compat

trl_utils = pytest.importorskip("trl.trainer.utils")


def trl64(fn, logits, *args, **kwargs):
    """Run TRL's function on a float64 copy: (outputs, d(Σ outputs·weights)/d logits) in float64."""
    x = logits.detach().double().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    return x, [o.detach() for o in outs], outs


def grads(outs, x, weights):
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, x)[0]


def make_logits(lead, vocab, dtype=torch.float32, holes=0.0):
    """Fresh logits with some -inf entries (``holes`` of them) and a few extreme values."""
    logits = torch.randn(*lead, vocab, dtype=torch.float64) * 3
    if holes:
        logits[torch.rand(logits.shape) < holes] = float("-inf")
    if logits.numel() > 4:
        flat = logits.view(-1)
        flat[torch.randint(0, flat.numel(), (2,))] = 1e4 * torch.tensor([1.0, -1.0], dtype=torch.float64)
    return logits.to(dtype)


def finite_labels(logits, shape):
    """Random labels whose logit is finite (a -inf label gives -inf in both; kept to its own test)."""
    labels = torch.randint(0, logits.shape[-1], shape)
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(torch.isinf(picked), logits.argmax(-1), labels)


# ------------------------------------------------------------------------------- one index per position


@pytest.mark.parametrize(
    "lead,vocab", [((1,), 1), ((3, 7), 13), ((2, 5), 1003), ((1, 3), 65537 + 100)], ids=str
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_selective_log_softmax_matches_trl(lead, vocab, temperature, masked):
    logits = make_logits(lead, vocab, holes=0.1 if vocab > 1 else 0.0)
    index = finite_labels(logits, lead)
    row_mask = (torch.rand(lead) > 0.3).long() if masked else None
    x, (want,), outs = trl64(trl_utils.selective_log_softmax, logits, index, temperature, row_mask)
    g = torch.randn(lead, dtype=torch.float64)
    want_grad = grads(outs, x, [g])

    ours_x = logits.detach().clone().requires_grad_(True)
    got = compat.selective_log_softmax(ours_x, index, temperature, row_mask)
    (got * g.float()).sum().backward()
    assert got.dtype == torch.float32 and got.shape == index.shape
    assert_close_fp32("logprobs", got, want, rtol=2e-5, atol=2e-4)
    assert_close_fp32("d logits", ours_x.grad, want_grad, rtol=2e-5, atol=2e-5)


def test_masked_positions_may_hold_pad_ids():
    """row_mask = 0 positions are never read: a pad id of -100 gives 0 and no gradient (TRL would fail)."""
    logits = torch.randn(2, 6, 17, requires_grad=True)
    index = torch.randint(0, 17, (2, 6))
    row_mask = torch.ones(2, 6, dtype=torch.bool)
    row_mask[0, 3:] = False
    row_mask[1, 1] = False  # a hole
    index[~row_mask] = -100
    got = compat.selective_log_softmax(logits, index, row_mask=row_mask)
    got.sum().backward()
    assert torch.all(got[~row_mask] == 0) and torch.all(logits.grad[~row_mask] == 0)
    want = trl_utils.selective_log_softmax(logits.detach().double(), index.clamp_min(0), row_mask=row_mask)
    assert_close_fp32("logprobs", got, want)


def test_invalid_inputs_raise_like_trl():
    logits, index = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    with pytest.raises(ValueError, match="temperature must be positive"):
        compat.selective_log_softmax(logits, index, temperature=0.0)
    index[0, 1] = 5  # out of range at an unmasked position: TRL's gather raises too
    with pytest.raises(ValueError, match="outside"):
        compat.selective_log_softmax(logits, index)
    with pytest.raises(ValueError, match="index has shape"):
        compat.selective_log_softmax(logits, torch.zeros(2, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------- top-K index


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("k", [1, 4])
def test_top_k_index_matches_trl(temperature, k):
    lead, vocab = (3, 5), 37
    logits = make_logits(lead, vocab, holes=0.1)
    logits[0, 0, :4] = 2.5  # ties inside one row's K
    index = torch.randint(0, vocab, (*lead, k))
    index[0, 0] = torch.arange(k) % 4
    index[1, 1, 0] = index[1, 1, -1]  # a duplicate index
    row_mask = (torch.rand(*lead, k) > 0.25).long()
    row_mask[2, 2] = 0  # a whole position masked
    keep_finite = torch.isfinite(logits.gather(-1, index)).all(-1)  # -inf picks: value-only test below
    row_mask = row_mask * keep_finite.unsqueeze(-1)

    x, (want,), outs = trl64(trl_utils.selective_log_softmax, logits, index, temperature, row_mask)
    g = torch.randn(*lead, k, dtype=torch.float64)
    want_grad = grads(outs, x, [g])
    ours_x = logits.detach().clone().requires_grad_(True)
    got = compat.selective_log_softmax(ours_x, index, temperature, row_mask)
    (got * g.float()).sum().backward()
    assert got.shape == index.shape
    assert_close_fp32("top-K logprobs", got, want, rtol=2e-5, atol=2e-4)
    assert_close_fp32("top-K d logits", ours_x.grad, want_grad, rtol=2e-5, atol=2e-5)


def test_top_k_with_neg_inf_picks():
    """Picked logits of -inf give -inf like TRL, also when all K of a position are -inf; NaN never."""
    logits = torch.randn(2, 9, dtype=torch.float64)
    logits[0, [1, 2]] = float("-inf")
    logits[1, [0, 3, 5]] = float("-inf")
    index = torch.tensor([[1, 4, 2], [0, 3, 5]])
    want = trl_utils.selective_log_softmax(logits, index)
    got = compat.selective_log_softmax(logits.float(), index)
    assert torch.isneginf(got[1]).all()
    assert_close_fp32("logprobs", got, want)


def test_top_k_empty_k():
    logits = torch.randn(2, 3, 5)
    got = compat.selective_log_softmax(logits, torch.zeros(2, 3, 0, dtype=torch.long))
    assert got.shape == (2, 3, 0)


# ------------------------------------------------------------------------------------------ low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [None, 3])
def test_low_precision_within_2x_of_trl(dtype, k):
    """Error vs float64 at most 2x TRL's own error in that dtype, for values and d(logits)."""
    lead, vocab = (4, 6), 3001
    logits = (torch.randn(*lead, vocab) * 4).to(dtype)
    index = torch.randint(0, vocab, lead if k is None else (*lead, k))
    g = torch.randn(index.shape)
    x, (want,), outs = trl64(trl_utils.selective_log_softmax, logits, index)
    want_grad = grads(outs, x, [g])

    def run(fn):
        xx = logits.detach().clone().requires_grad_(True)
        out = fn(xx, index)
        (out * g.to(out.dtype)).sum().backward()
        return out, xx.grad

    trl_out, trl_grad = run(trl_utils.selective_log_softmax)
    got, got_grad = run(compat.selective_log_softmax)
    assert got.dtype == torch.float32  # accumulated and returned in fp32 (TRL's CPU path: the input dtype)
    assert_within_2x("logprobs", got, want, trl_out)
    floor = torch.finfo(dtype).eps / 8
    if k is not None:
        # The top-K path gets d(logits) at each position's anchor column as the sum of two terms of size
        # Σ_k g_k rounded apart (see compat.trl._select_top_k): up to ~1.5 ulp of Σ_k |g_k| there.
        floor = 2 * torch.finfo(dtype).eps * float(g.abs().sum(-1).max())
    assert_within_2x("d logits", got_grad, want_grad, trl_grad, floor=floor)


# ----------------------------------------------------------------------------------------------- entropy


def entropy64(logits, temperature=1.0):
    """Entropy written out in float64 with p·log p = 0 at p = 0 (TRL's CPU path gives NaN at -inf logits)."""
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return -(logp.exp() * torch.where(torch.isneginf(logp), 0.0, logp)).sum(-1)


@pytest.mark.parametrize("holes", [0.0, 0.2])
def test_logprobs_and_entropy_match_trl(holes):
    lead, vocab, temperature = (3, 8), 101, 0.8
    logits = make_logits(lead, vocab, holes=holes)
    index = finite_labels(logits, lead)
    row_mask = torch.rand(lead) > 0.3
    g_lp, g_ent = torch.randn(lead, dtype=torch.float64), torch.randn(lead, dtype=torch.float64)

    ours_x = logits.detach().clone().requires_grad_(True)
    lp, ent = compat.selective_log_softmax_and_entropy(
        ours_x, index, temperature=temperature, row_mask=row_mask
    )
    ((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum()).backward()
    assert_no_nan("entropy", ent)
    want_ent = torch.where(row_mask, entropy64(logits, temperature), 0.0)
    assert_close_fp32("entropy", ent, want_ent, rtol=2e-5, atol=2e-4)

    if holes == 0.0:  # TRL's CPU entropy is NaN at -inf logits, so compare with it only without them
        x, (want_lp, trl_ent), outs = trl64(
            trl_utils.selective_log_softmax_and_entropy,
            logits,
            index,
            temperature=temperature,
            row_mask=row_mask,
        )
        assert_close_fp32("entropy vs TRL", ent, trl_ent, rtol=2e-5, atol=2e-4)
        assert_close_fp32("logprobs", lp, want_lp, rtol=2e-5, atol=2e-4)
        assert_close_fp32("d logits", ours_x.grad, grads(outs, x, [g_lp, g_ent]), rtol=2e-5, atol=2e-5)


def test_entropy_requires_grad_false_detaches():
    logits = torch.randn(2, 3, 11, requires_grad=True)
    index = torch.randint(0, 11, (2, 3))
    lp, ent = compat.selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=False)
    assert lp.requires_grad and not ent.requires_grad


def test_entropy_from_logits_matches_trl():
    logits = torch.randn(3, 4, 257, dtype=torch.float64) * 2
    x, (want,), outs = trl64(trl_utils.entropy_from_logits, logits, chunk_size=5)
    g = torch.randn(3, 4, dtype=torch.float64)
    ours_x = logits.float().requires_grad_(True)
    got = compat.entropy_from_logits(ours_x, chunk_size=5)
    (got * g.float()).sum().backward()
    assert_close_fp32("entropy", got, want, rtol=2e-5, atol=2e-5)
    assert_close_fp32("d logits", ours_x.grad, grads(outs, x, [g]), rtol=2e-5, atol=2e-5)


def test_triton_interpreter_top_k_with_mask(monkeypatch):
    """The masked label (int64's minimum) and the top-K path through the real Triton kernel, tiny."""
    from fastrlhf.ops import available_backends

    if not (available_backends()["triton"].available and "cpu" in available_backends()["triton"].devices):
        pytest.skip(available_backends()["triton"].reason)
    monkeypatch.setenv("FASTRLHF_BACKEND", "triton")
    logits = torch.randn(2, 3, 19)
    index = torch.randint(0, 19, (2, 3, 2))
    row_mask = torch.rand(2, 3, 2) > 0.3
    got = compat.selective_log_softmax(logits, index, 0.9, row_mask)
    want = trl_utils.selective_log_softmax(logits.double(), index, 0.9, row_mask)
    assert_close_fp32("logprobs", got, want)


# ------------------------------------------------------------------------------------------------ patch()


@pytest.fixture
def restore_trl():
    names = ("selective_log_softmax", "selective_log_softmax_and_entropy", "entropy_from_logits")
    originals = {name: getattr(trl_utils, name) for name in names}
    yield originals
    compat.unpatch()
    for name, fn in originals.items():
        setattr(trl_utils, name, fn)


def test_patch_swaps_every_binding_and_unpatch_restores(restore_trl, monkeypatch):
    original = restore_trl["selective_log_softmax"]
    # A trainer module that did `from trl.trainer.utils import selective_log_softmax` before the patch.
    early = types.ModuleType("trl._fastrlhf_test_early")
    early.selective_log_softmax = original
    monkeypatch.setitem(sys.modules, early.__name__, early)

    handle = compat.patch()
    assert handle.active and "trl.trainer.utils.selective_log_softmax" in handle.patched
    assert trl_utils.selective_log_softmax is compat.selective_log_softmax
    assert trl_utils.selective_log_softmax_and_entropy is compat.selective_log_softmax_and_entropy
    assert trl_utils.entropy_from_logits is compat.entropy_from_logits
    assert early.selective_log_softmax is compat.selective_log_softmax

    # TRL's call site now runs the kernel: bf16 logits come back in float32 (TRL's CPU path keeps bf16).
    logits, index = torch.randn(2, 5, 33).bfloat16(), torch.randint(0, 33, (2, 5))
    assert trl_utils.selective_log_softmax(logits, index).dtype == torch.float32

    # A module imported while patched copies our function; unpatch finds and restores it too.
    late = types.ModuleType("trl._fastrlhf_test_late")
    late.selective_log_softmax = trl_utils.selective_log_softmax
    monkeypatch.setitem(sys.modules, late.__name__, late)

    handle.unpatch()
    assert not handle.active
    for name, fn in restore_trl.items():
        assert getattr(trl_utils, name) is fn
    assert early.selective_log_softmax is original and late.selective_log_softmax is original
    handle.unpatch()  # twice is harmless


def test_patch_as_context_manager_and_twice(restore_trl):
    original = restore_trl["selective_log_softmax"]
    with compat.patch() as first:
        second = compat.patch()  # already patched: records nothing, undoes nothing
        assert not second.active
        second.unpatch()
        assert trl_utils.selective_log_softmax is compat.selective_log_softmax
        assert (
            max_abs_err(
                trl_utils.selective_log_softmax(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long)),
                torch.full((1,), -torch.log(torch.tensor(4.0))),
            )
            < 1e-6
        )
    assert not first.active and trl_utils.selective_log_softmax is original


def test_module_unpatch_undoes_all(restore_trl):
    compat.patch()
    compat.unpatch()
    assert trl_utils.selective_log_softmax is restore_trl["selective_log_softmax"]
