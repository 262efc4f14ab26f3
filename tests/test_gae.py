"""gae and compute_advantages on every backend, on the CPU and (when one is present) the GPU, against the
float64 reference on the CPU (itself checked against scalar re-statements of TRL's and veRL's loops in
test_reference.py)."""

import pytest
import torch
from conftest import on_device, op_targets
from loops import gae_mask_carry_loop, gae_right_padded_loop
from numerics import assert_close_fp32

from fastrlhf.ops import compute_advantages, gae, masked_whiten, reference


def make_mask(batch, length, kind):
    if kind == "right-padded":
        lengths = torch.randint(0, length + 1, (batch,))
        return torch.arange(length)[None, :] < lengths[:, None]
    mask = torch.rand(batch, length) > 0.3  # holes
    mask[0] = False
    return mask


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (4, 300), (2, 2049)])
@pytest.mark.parametrize("kind", ["right-padded", "holes"])
def test_gae_matches_reference(backend, device, batch, length, kind):
    rewards, values = torch.randn(batch, length), torch.randn(batch, length)
    mask = make_mask(batch, length, kind)
    adv, ret = gae(*on_device(device, rewards, values, mask), 0.99, 0.95, backend=backend)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    # The recurrence sums up to ~1/(1-γλ) ≈ 17 terms of O(1): fp32 accumulates ~1e-6 relative.
    assert_close_fp32("advantages", adv, want_adv, rtol=1e-5, atol=1e-5)
    assert_close_fp32("returns", ret, want_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", op_targets(include_torch=False))
def test_gae_long_sequences(backend, device):
    length = 4099 if backend == "triton" and device == "cpu" else 32768  # the interpreter is slow
    rewards, values = torch.randn(3, length), torch.randn(3, length)
    mask = make_mask(3, length, "holes")
    adv, ret = gae(*on_device(device, rewards, values, mask), 1.0, 0.95, backend=backend)
    want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    assert_close_fp32("advantages", adv, want_adv, rtol=1e-5, atol=5e-5)
    assert_close_fp32("returns", ret, want_ret, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("backend,device", op_targets())
def test_gae_gamma_lambda_edges_and_empty(backend, device):
    rewards, values = torch.randn(2, 9), torch.randn(2, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    for gamma, lam in [(1.0, 1.0), (0.0, 0.0), (1.0, 0.0)]:
        adv, _ = gae(*on_device(device, rewards, values, mask), gamma, lam, backend=backend)
        want, _ = reference.gae(rewards.double(), values.double(), mask, gamma, lam)
        assert_close_fp32(f"advantages γ={gamma} λ={lam}", adv, want, rtol=1e-5, atol=1e-5)
    empty = on_device(device, torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0, 5))
    adv, ret = gae(*empty, 1.0, 0.9, backend=backend)
    assert adv.shape == (0, 5) and ret.shape == (0, 5)


def test_gae_validation():
    x = torch.randn(2, 4)
    m = torch.ones(2, 4)
    for name, kwargs in [
        ("gamma", dict(gamma=float("nan"), lam=0.9)),
        ("lam", dict(gamma=1.0, lam=float("inf"))),
    ]:
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            gae(x, x, m, **kwargs)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        gae(x, x, m, 1.5, 0.9)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        gae(x, x, m * 0.5, 1.0, 0.9)
    with pytest.raises(ValueError, match="values must be 2-D"):
        gae(x[0], x[0], m[0], 1.0, 0.9)
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 3\)"):
        gae(x[:, :3], x, m, 1.0, 0.9)


def test_masked_whiten():
    x = torch.randn(3, 10, dtype=torch.float64)
    mask = torch.rand(3, 10) > 0.3
    out = masked_whiten(x, mask)
    sel = out[mask]
    assert abs(sel.mean().item()) < 1e-9
    assert sel.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-9)
    with pytest.raises(ValueError, match="at least 2 positions"):
        masked_whiten(x, torch.zeros_like(mask))


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("kind", ["right-padded", "holes"])
@pytest.mark.parametrize("length", [1, 13, 700])
def test_compute_advantages_matches_composed_reference(backend, device, estimator, kind, length):
    batch = 4
    logp, ref = -torch.rand(batch, length) * 4, -torch.rand(batch, length) * 4
    values, scores = torch.randn(batch, length), torch.randn(batch) * 3
    mask = make_mask(batch, length, kind)
    mask[1, 0] = True  # at least two valid tokens overall for whitening
    mask[-1, -1] = True
    inputs = on_device(device, scores, logp, ref, values, mask)
    out = compute_advantages(*inputs, 0.05, estimator, 1.0, 0.95, whiten=False, backend=backend)
    # Composed by hand from the reference pieces: KL rewards, score at the last valid token, GAE.
    rewards = -0.05 * reference.kl_penalty(logp.double(), ref.double(), mask, estimator)
    for b in range(batch):
        valid = mask[b].nonzero()
        if len(valid):
            rewards[b, valid[-1, 0]] += scores[b].double()
    want_adv, want_ret = reference.gae(rewards, values.double(), mask, 1.0, 0.95)
    assert_close_fp32("token_rewards", out.token_rewards, rewards, rtol=1e-5, atol=1e-6)
    assert_close_fp32("advantages", out.advantages, want_adv, rtol=1e-5, atol=1e-5)
    assert_close_fp32("returns", out.returns, want_ret, rtol=1e-5, atol=1e-5)
    whitened = compute_advantages(*inputs, 0.05, estimator, 1.0, 0.95, backend=backend)
    assert_close_fp32(
        "whitened", whitened.advantages, reference.masked_whiten(want_adv, mask), rtol=1e-4, atol=1e-5
    )


def test_compute_advantages_score_clip_and_validation():
    logp = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    out = compute_advantages(
        torch.tensor([10.0, -10.0]), logp, logp, logp, mask, 0.1, score_clip=2.0, whiten=False
    )
    assert out.token_rewards[:, -1].tolist() == [2.0, -2.0]
    with pytest.raises(ValueError, match=r"scores has shape \(3,\); expected \(2,\)"):
        compute_advantages(torch.zeros(3), logp, logp, logp, mask, 0.1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        compute_advantages(torch.zeros(2), logp, logp, logp, mask, -0.1)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("kind", ["right-padded", "holes"])
@pytest.mark.parametrize("length", [1, 5, 257])
def test_gae_against_independent_python_loops(backend, device, kind, length):
    """Each backend straight against the peers' loops (tests/loops.py), not only against reference.gae."""
    rewards, values = torch.randn(5, length), torch.randn(5, length)
    mask = make_mask(5, length, kind)
    adv, ret = gae(*on_device(device, rewards, values, mask), 0.98, 0.9, backend=backend)
    want_adv, want_ret = gae_mask_carry_loop(rewards, values, mask, 0.98, 0.9)
    assert_close_fp32("advantages", adv, want_adv, rtol=1e-5, atol=1e-5)
    assert_close_fp32("returns", ret, want_ret, rtol=1e-5, atol=1e-5)
    if kind == "right-padded":
        for b in range(5):
            n = int(mask[b].sum())
            want = gae_right_padded_loop(rewards[b].tolist(), values[b].tolist(), n, 0.98, 0.9)
            assert_close_fp32(
                f"row {b}", adv[b], torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("backend,device", op_targets())
def test_gae_all_masked_rows_are_zero(backend, device):
    rewards, values = torch.randn(3, 40), torch.randn(3, 40)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[1, 7:19] = True
    adv, ret = gae(*on_device(device, rewards, values, mask), 1.0, 1.0, backend=backend)
    assert torch.all(adv[0] == 0) and torch.all(ret[2] == 0)
    want_adv, _ = gae_mask_carry_loop(rewards, values, mask, 1.0, 1.0)
    assert_close_fp32("advantages", adv, want_adv, rtol=1e-5, atol=1e-5)
