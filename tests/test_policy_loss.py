"""ppo_policy_loss (from log-probs and fused from hidden states) and value_loss against eager float64
re-statements of veRL's / OpenRLHF's losses: values, stats and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_backends, on_device, op_targets
from loops import eager_logprobs_from_hidden, eager_ppo_policy_loss, eager_value_loss
from numerics import assert_close_fp32, assert_within_2x

import fastrlhf.ops.policy_loss as policy_loss_module
from fastrlhf.ops import (
    gather_logprobs,
    linear_logprobs,
    linear_ppo_policy_loss,
    ppo_policy_loss,
    value_loss,
)

CONFIGS = [
    dict(clip_low=0.2, clip_high=0.2),
    dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    dict(clip_low=0.1, clip_high=0.3, kl_coef=0.05, estimator="k3", entropy_coef=0.01),
    dict(clip_low=0.2, clip_high=0.2, kl_coef=0.1, estimator="k1"),
    dict(clip_low=0.2, clip_high=0.2, kl_coef=0.1, estimator="k2", loss_agg="seq-mean-token-mean"),
    dict(
        clip_low=0.15,
        clip_high=0.25,
        kl_coef=0.02,
        estimator="abs",
        entropy_coef=0.02,
        loss_agg="seq-mean-token-mean",
        dual_clip=2.0,
    ),
]


def op_kwargs(cfg):
    return dict(
        clip_eps=cfg["clip_low"],
        clip_eps_high=cfg["clip_high"],
        dual_clip=cfg.get("dual_clip"),
        kl_coef=cfg.get("kl_coef", 0.0),
        kl_estimator=cfg.get("estimator", "k3"),
        entropy_coef=cfg.get("entropy_coef", 0.0),
        loss_agg=cfg.get("loss_agg", "token-mean"),
    )


def eager_kwargs(cfg):
    return dict(
        dual_clip=cfg.get("dual_clip"),
        kl_coef=cfg.get("kl_coef", 0.0),
        estimator=cfg.get("estimator", "k3"),
        entropy_coef=cfg.get("entropy_coef", 0.0),
        loss_agg=cfg.get("loss_agg", "token-mean"),
    )


def rollout(batch, length, spread=0.4):
    """Old log-probs, advantages, a right-padded mask with an empty row, and a reference near them."""
    old = -torch.rand(batch, length) * 4
    adv = torch.randn(batch, length) * 2
    lengths = torch.randint(length // 2 + 1, length + 1, (batch,))  # enough tokens that some clip
    lengths[-1] = 0  # a sequence with no response token
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ref = old + torch.randn(batch, length) * spread
    return old, adv, mask, ref


# --------------------------------------------------------------------------------- from log-probs

# The log-prob form runs on the reference and on the C++ / CUDA op (it has no Triton kernel).
LOGPROB_TARGETS = [p for p in op_targets() if p.values[0] in ("torch", "cpp", "cuda")]


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_logprob_form_matches_eager_float64(cfg, backend, device):
    batch, length = 6, 13
    old, adv, mask, ref = rollout(batch, length)
    # New log-probs spread around the old ones so some ratios clip on each side.
    new = old + torch.randn(batch, length) * 0.3
    entropy = torch.rand(batch, length) * 3
    lp = new.clone().to(device).requires_grad_(True)
    ent = entropy.clone().to(device).requires_grad_(True)
    result = ppo_policy_loss(
        lp,
        *on_device(device, old, adv, mask),
        ref_logprobs=ref.to(device),
        entropy=ent,
        backend=backend,
        **op_kwargs(cfg),
    )
    result.loss.backward()

    lp64 = new.double().requires_grad_(True)
    ent64 = entropy.double().requires_grad_(True)
    loss, clip_fraction, approx_kl = eager_ppo_policy_loss(
        lp64,
        old.double(),
        adv.double(),
        mask,
        cfg["clip_low"],
        cfg["clip_high"],
        ref=ref.double(),
        entropy=ent64,
        **eager_kwargs(cfg),
    )
    loss.backward()
    assert 0 < float(clip_fraction) < 1, "the case must exercise both clipped and unclipped tokens"
    assert_close_fp32("loss", result.loss, loss, rtol=1e-5, atol=1e-6)
    assert_close_fp32("clip_fraction", result.clip_fraction, clip_fraction)
    assert_close_fp32("approx_kl", result.approx_kl, approx_kl, rtol=1e-5, atol=1e-6)
    assert_close_fp32("grad logprobs", lp.grad, lp64.grad, rtol=1e-5, atol=1e-7)
    if cfg.get("entropy_coef"):
        assert_close_fp32("grad entropy", ent.grad, ent64.grad, rtol=1e-5, atol=1e-8)
    else:
        assert ent.grad is None and ent64.grad is None
    m = mask.double()
    assert_close_fp32("mean entropy", result.entropy, (entropy.double() * m).sum() / m.sum())


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
def test_garbage_in_padding_is_ignored(backend, device):
    """Padded positions may hold inf/NaN (e.g. unfilled buffers): the loss and gradient stay finite."""
    old, adv, mask, ref = rollout(4, 9)
    new = old + 0.1 * torch.randn(4, 9)
    entropy = torch.rand(4, 9)
    for t in (old, adv, ref, entropy):
        t[~mask] = float("nan")
    old[~mask & (torch.rand(4, 9) < 0.5)] = float("inf")
    lp = new.clone().to(device).requires_grad_(True)
    ent = entropy.to(device).requires_grad_(True)
    result = ppo_policy_loss(
        lp,
        *on_device(device, old, adv, mask),
        ref_logprobs=ref.to(device),
        entropy=ent,
        kl_coef=0.1,
        entropy_coef=0.01,
        backend=backend,
    )
    result.loss.backward()
    for name, value in result._asdict().items():
        assert value is None or torch.isfinite(value).all(), name
    assert torch.isfinite(lp.grad).all() and torch.all(lp.grad[~mask.to(device)] == 0)
    assert torch.isfinite(ent.grad).all() and torch.all(ent.grad[~mask.to(device)] == 0)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
def test_a_nan_on_a_valid_token_is_not_hidden(backend, device):
    old, adv, mask, _ = rollout(3, 6)
    new = old.clone()
    new[0, 0] = float("nan")
    assert mask[0, 0]
    result = ppo_policy_loss(*on_device(device, new, old, adv, mask), backend=backend)
    assert torch.isnan(result.loss) and torch.isnan(result.approx_kl)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
def test_no_valid_token_gives_zero_loss(backend, device):
    old, adv, _, _ = rollout(3, 5)
    lp = old.clone().to(device).requires_grad_(True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        empty = torch.zeros(3, 5, dtype=torch.bool, device=device)
        result = ppo_policy_loss(lp, *on_device(device, old, adv), empty, loss_agg=agg, backend=backend)
        assert float(result.loss) == 0.0 and float(result.clip_fraction) == 0.0
        result.loss.backward()
        assert torch.all(lp.grad == 0)
    # Sequences of length 0: nothing to average, and nothing to differentiate.
    nothing = torch.empty(3, 0, device=device)
    for agg in ("token-mean", "seq-mean-token-mean"):
        lp = nothing.clone().requires_grad_(True)
        result = ppo_policy_loss(lp, nothing, nothing, nothing.bool(), loss_agg=agg, backend=backend)
        assert float(result.loss) == 0.0 and float(result.approx_kl) == 0.0
        result.loss.backward()
        assert lp.grad.shape == (3, 0)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
def test_extreme_log_ratios_stay_finite(backend, device):
    old, adv, mask, _ = rollout(3, 8)
    new = old.clone()
    new[0, :3] = old[0, :3] + 80.0  # ratio e^80 before the cap
    new[1, :3] = old[1, :3] - 80.0
    adv[0, 1] = 0.0
    lp = new.clone().to(device).requires_grad_(True)
    result = ppo_policy_loss(lp, *on_device(device, old, adv, mask), dual_clip=3.0, backend=backend)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(lp.grad).all()
    want = ppo_policy_loss(new.double().requires_grad_(True), old.double(), adv.double(), mask, dual_clip=3.0)
    want.loss.backward()
    assert_close_fp32("loss", result.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_ties_get_autograds_split(backend, device, loss_agg):
    """On-policy (ratio exactly 1) the clipped and unclipped terms tie on every token, and torch's max
    sends half the gradient each way (the clamp passes its half). The op's formula gives the float64
    reference's gradient there, with and without the dual clip."""
    old, adv, mask, _ = rollout(5, 7)
    new = old.clone()
    cases = []
    for dual in (None, 2.0):
        lp = new.clone().to(device).requires_grad_(True)
        got = ppo_policy_loss(
            lp, *on_device(device, old, adv, mask), dual_clip=dual, loss_agg=loss_agg, backend=backend
        )
        got.loss.backward()
        lp64 = new.double().requires_grad_(True)
        want = ppo_policy_loss(lp64, old.double(), adv.double(), mask, dual_clip=dual, loss_agg=loss_agg)
        want.loss.backward()
        cases.append((got, lp.grad, want, lp64.grad))
    for got, grad, want, grad64 in cases:
        assert float(got.clip_fraction) == 0.0 and float(got.approx_kl) == 0.0
        assert_close_fp32("loss", got.loss, want.loss, rtol=1e-6, atol=1e-7)
        assert_close_fp32("grad", grad, grad64, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
def test_many_segments_and_threads_against_float64(backend, device):
    """More tokens than one kernel row holds (token-mean sums fixed segments of 16384 in parallel)."""
    n = 40_000 + 17
    old = -torch.rand(n) * 5
    new = old + torch.randn(n) * 0.3
    adv = torch.randn(n)
    mask = torch.rand(n) < 0.9
    ref = old + torch.randn(n) * 0.2
    kwargs = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.05, kl_estimator="k3")
    lp = new.clone().to(device).requires_grad_(True)
    got = ppo_policy_loss(
        lp, *on_device(device, old, adv, mask), ref_logprobs=ref.to(device), backend=backend, **kwargs
    )
    got.loss.backward()
    lp64 = new.double().requires_grad_(True)
    want = ppo_policy_loss(lp64, old.double(), adv.double(), mask, ref_logprobs=ref.double(), **kwargs)
    want.loss.backward()
    for name in ("loss", "clip_fraction", "approx_kl", "ref_kl"):
        assert_close_fp32(name, getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-7)
    assert_close_fp32("grad", lp.grad, lp64.grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("backend,device", LOGPROB_TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_within_2x_of_torch(backend, device, dtype):
    old, adv, mask, ref = rollout(8, 33)
    new = old + torch.randn(8, 33) * 0.3
    kwargs = dict(clip_eps=0.2, kl_coef=0.1, kl_estimator="k2", loss_agg="seq-mean-token-mean")
    low = [t.to(dtype) for t in (new, old, adv, ref)]
    lp = low[0].detach().clone().to(device).requires_grad_(True)
    got = ppo_policy_loss(
        lp,
        *on_device(device, low[1], low[2], mask),
        ref_logprobs=low[3].to(device),
        backend=backend,
        **kwargs,
    )
    got.loss.backward()
    assert lp.grad.dtype == dtype
    # The torch reference run in that dtype's inputs, and float64 on the same rounded inputs' originals.
    lp_t = low[0].detach().clone().requires_grad_(True)
    torch_run = ppo_policy_loss(lp_t, low[1], low[2], mask, ref_logprobs=low[3], backend="torch", **kwargs)
    torch_run.loss.backward()
    lp64 = new.double().requires_grad_(True)
    want = ppo_policy_loss(lp64, old.double(), adv.double(), mask, ref_logprobs=ref.double(), **kwargs)
    want.loss.backward()
    assert_within_2x("loss", got.loss.cpu(), want.loss, torch_run.loss)
    assert_within_2x("grad", lp.grad.cpu(), lp64.grad, lp_t.grad)


def test_the_log_prob_form_has_no_triton_backend():
    old, adv, mask, _ = rollout(2, 4)
    with pytest.raises(ValueError, match="no triton implementation"):
        ppo_policy_loss(old, old, adv, mask, backend="triton")


def test_a_backend_preference_the_op_lacks_falls_back_to_its_auto_order(monkeypatch):
    old, adv, mask, _ = rollout(2, 4)
    want = ppo_policy_loss(old.clone(), old, adv, mask)
    monkeypatch.setenv("FASTRLHF_BACKEND", "triton")
    got = ppo_policy_loss(old.clone(), old, adv, mask)
    assert_close_fp32("loss", got.loss, want.loss)


# --------------------------------------------------------------------------------- fused from hidden


def make_hidden_case(batch, length, hidden_size, vocab, dtype=torch.float32):
    hidden = torch.randn(batch, length, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * (2.0 / math.sqrt(hidden_size))).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, -2:] = -100
    return hidden, weight, bias, labels


def fused_case(backend, cfg, hidden, weight, bias, labels, old, adv, mask, ref, temperature, chunk_size=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    result = linear_ppo_policy_loss(
        leaves[0],
        leaves[1],
        labels,
        old,
        adv,
        mask,
        bias=leaves[2],
        temperature=temperature,
        ref_logprobs=ref,
        compute_entropy=True,
        chunk_size=chunk_size,
        backend=backend,
        **op_kwargs(cfg),
    )
    result.loss.backward()
    return result, [t.grad for t in leaves]


def eager_hidden_case(cfg, hidden, weight, bias, labels, old, adv, mask, ref, temperature, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = eager_logprobs_from_hidden(leaves[0], leaves[1], labels, leaves[2], temperature)
    valid = mask & (labels != -100)
    loss, clip_fraction, approx_kl = eager_ppo_policy_loss(
        lp,
        old.to(lp.dtype),
        adv.to(lp.dtype),
        valid,
        cfg["clip_low"],
        cfg["clip_high"],
        ref=ref.to(lp.dtype),
        entropy=ent,
        **eager_kwargs(cfg),
    )
    loss.backward()
    return (loss, clip_fraction, approx_kl), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", CONFIGS[1:3] + CONFIGS[5:])
def test_hidden_form_matches_eager_float64(backend, cfg):
    batch, length, hidden_size, vocab = 4, 11, 24, 517
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab)
    with torch.no_grad():
        now = linear_logprobs(hidden, weight, labels, bias, temperature=0.8)
    old = now + 0.3 * torch.randn(batch, length)
    _, adv, mask, ref = rollout(batch, length)
    ref = now + 0.2 * torch.randn(batch, length)
    result, grads = fused_case(
        backend, cfg, hidden, weight, bias, labels, old, adv, mask, ref, 0.8, chunk_size=6
    )
    (loss, clip_fraction, approx_kl), want = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 0.8, torch.float64
    )
    assert_close_fp32("loss", result.loss, loss, rtol=1e-5, atol=1e-6)
    assert_close_fp32("clip_fraction", result.clip_fraction, clip_fraction)
    assert_close_fp32("approx_kl", result.approx_kl, approx_kl, rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, want, strict=True):
        assert_close_fp32(f"grad {name}", got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [p for p in cpu_backends(include_torch=False) if p.values[0] == "triton"])
@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[5]], ids=["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("route", ["compiled", "autograd"])
def test_hidden_form_token_gradient_routes_match_float64(backend, cfg, route, monkeypatch):
    """The Python engine (the Triton backend's; cpp and cuda run the C++ op): each chunk's d(loss)/d(log-prob)
    comes from the ppo_policy_loss op's backward with the loss's token weights as its row weights, or,
    without the extension, from autograd through the reference's token losses. Both routes, with entropy
    and KL terms, padding, an empty row and many chunks, against float64."""
    if route == "compiled" and not policy_loss_module.compiled_ops_run_on("cpu"):
        pytest.skip("the extension is not built")
    if route == "autograd":
        monkeypatch.setattr(policy_loss_module, "compiled_ops_run_on", lambda device_type: False)
    batch, length, hidden_size, vocab = 5, 9, 16, 211
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab)
    with torch.no_grad():
        now = linear_logprobs(hidden, weight, labels, bias, temperature=1.1)
    old = now + 0.3 * torch.randn(batch, length)
    _, adv, mask, _ = rollout(batch, length)
    ref = now + 0.2 * torch.randn(batch, length)
    result, grads = fused_case(
        backend, cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.1, chunk_size=4
    )
    (loss, clip_fraction, _), want = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.1, torch.float64
    )
    assert float(clip_fraction) > 0  # the clipped branch is exercised
    assert_close_fp32("loss", result.loss, loss, rtol=1e-5, atol=1e-6)
    for name, got, expected in zip(("hidden", "weight", "bias"), grads, want, strict=True):
        assert_close_fp32(f"grad {name}", got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_hidden_form_bf16_within_2x(backend):
    cfg = CONFIGS[2]
    batch, length, hidden_size, vocab = 3, 9, 32, 389
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab, torch.bfloat16)
    with torch.no_grad():
        now = linear_logprobs(hidden, weight, labels, bias)
    old = now + 0.3 * torch.randn(batch, length)
    _, adv, mask, _ = rollout(batch, length)
    ref = now + 0.2 * torch.randn(batch, length)
    result, grads = fused_case(
        backend, cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0, chunk_size=5
    )
    want_stats, want = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0, torch.float64
    )
    lowp_stats, lowp = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0, torch.bfloat16
    )
    assert_within_2x("loss", result.loss, want_stats[0], lowp_stats[0].float())
    for name, got, expected, torch_grad in zip(("hidden", "weight", "bias"), grads, want, lowp, strict=True):
        assert got.dtype == torch.bfloat16
        assert_within_2x(f"grad {name}", got, expected, torch_grad)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[5]], ids=["token-mean", "seq-mean-token-mean"])
def test_hidden_form_in_one_chunk_matches_float64(backend, dtype, cfg):
    """The default chunk size holds these 21 rows in one chunk: the C++ op then takes the whole tensors
    and its gradient's rows unsliced (the path of most small calls). Loss and all three gradients against
    float64; bf16 within 2x of the torch composition run in bf16."""
    batch, length, hidden_size, vocab = 3, 7, 16, 97
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab, dtype)
    with torch.no_grad():
        now = linear_logprobs(hidden.float(), weight.float(), labels, bias.float())
    old = now + 0.3 * torch.randn(batch, length)
    _, adv, mask, _ = rollout(batch, length)
    ref = now + 0.2 * torch.randn(batch, length)
    result, grads = fused_case(backend, cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0)
    (loss, _, _), want = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0, torch.float64
    )
    if dtype == torch.float32:
        assert_close_fp32("loss", result.loss, loss, rtol=1e-5, atol=1e-6)
        for name, got, expected in zip(("hidden", "weight", "bias"), grads, want, strict=True):
            assert_close_fp32(f"grad {name}", got, expected, rtol=1e-4, atol=1e-6)
        return
    (lowp_loss, _, _), lowp = eager_hidden_case(
        cfg, hidden, weight, bias, labels, old, adv, mask, ref, 1.0, dtype
    )
    assert_within_2x("loss", result.loss, loss, lowp_loss.float())
    for name, got, expected, torch_grad in zip(("hidden", "weight", "bias"), grads, want, lowp, strict=True):
        assert got.dtype == dtype
        assert_within_2x(f"grad {name}", got, expected, torch_grad)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hidden_form_of_an_empty_batch_gives_zero_loss_and_zero_gradients(backend, dtype):
    """No token at all ([2, 0]): loss 0, no NaN, and zero gradients of the inputs' shapes and dtypes."""
    hidden = torch.randn(2, 0, 8).to(dtype).requires_grad_(True)
    weight = torch.randn(16, 8).to(dtype).requires_grad_(True)
    bias = torch.randn(16).to(dtype).requires_grad_(True)
    empty = torch.empty(2, 0)
    result = linear_ppo_policy_loss(
        hidden,
        weight,
        torch.empty(2, 0, dtype=torch.long),
        empty,
        empty,
        torch.empty(2, 0, dtype=torch.bool),
        bias=bias,
        backend=backend,
    )
    result.loss.backward()
    assert float(result.loss.detach()) == 0.0 and result.logprobs.shape == (2, 0)
    for name, leaf in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        assert leaf.grad is not None, name
        assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == dtype, name
        assert not leaf.grad.any(), name


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("chunk", [None, 7])
def test_first_epoch_ratio_is_exactly_one(backend, chunk):
    """Old log-probs from the same weights: every ratio is exactly 1, nothing clips, approx KL is 0, and
    the loss is exactly -mean(A) for both forms. With several chunks too: linear_logprobs under no_grad
    makes the same row blocks as the fused loss."""
    batch, length, hidden_size, vocab = 3, 10, 16, 301
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab)
    weight.requires_grad_(True)  # a Parameter, as in training: no_grad alone decides that no backward follows
    _, adv, mask, _ = rollout(batch, length)
    with torch.no_grad():
        old = linear_logprobs(hidden, weight, labels, bias, chunk_size=chunk, backend=backend)
    result = linear_ppo_policy_loss(
        hidden.requires_grad_(True),
        weight,
        labels,
        old,
        adv,
        mask,
        bias=bias,
        chunk_size=chunk,
        backend=backend,
    )
    weight = weight.detach()
    valid = mask & (labels != -100)
    expected = -(adv[valid].double().sum() / valid.sum())
    assert float(result.approx_kl) == 0.0 and float(result.clip_fraction) == 0.0
    assert_close_fp32("loss", result.loss, expected, rtol=1e-6, atol=1e-7)

    logits = hidden.detach() @ weight.T + bias
    old_lp = gather_logprobs(logits, labels, backend=backend).detach()
    new_lp = gather_logprobs(logits.requires_grad_(True), labels, backend=backend)
    result = ppo_policy_loss(new_lp, old_lp, adv, valid)
    assert float(result.approx_kl) == 0.0 and float(result.clip_fraction) == 0.0
    assert_close_fp32("loss", result.loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cfg", [CONFIGS[2], CONFIGS[5]])
def test_on_policy_form_matches_eager_float64_with_detached_old(backend, cfg):
    """``old_logprobs=None``: the loss, stats and gradients of a float64 eager loss whose old log-probs are
    its own new ones, detached. Ratio exactly 1: no clipping, approx KL exactly 0; the KL and entropy terms
    still act."""
    batch, length, hidden_size, vocab = 3, 13, 20, 433
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab)
    _, adv, mask, _ = rollout(batch, length)
    with torch.no_grad():
        ref = linear_logprobs(hidden, weight, labels, bias, temperature=1.3)
    ref = ref + 0.2 * torch.randn(batch, length)
    result, grads = fused_case(
        backend, cfg, hidden, weight, bias, labels, None, adv, mask, ref, 1.3, chunk_size=7
    )
    leaves = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = eager_logprobs_from_hidden(leaves[0], leaves[1], labels, leaves[2], 1.3)
    loss, clip_fraction, approx_kl = eager_ppo_policy_loss(
        lp,
        lp.detach(),
        adv.double(),
        mask & (labels != -100),
        cfg["clip_low"],
        cfg["clip_high"],
        ref=ref.double(),
        entropy=ent,
        **eager_kwargs(cfg),
    )
    loss.backward()
    assert float(result.approx_kl) == 0.0 and float(result.clip_fraction) == 0.0
    assert float(clip_fraction) == 0.0 and float(approx_kl) == 0.0
    assert_close_fp32("loss", result.loss, loss, rtol=1e-5, atol=1e-6)
    for name, got, leaf in zip(("hidden", "weight", "bias"), grads, leaves, strict=True):
        assert_close_fp32(f"grad {name}", got, leaf.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_hidden_form_entropy_and_ref_kl_stats(backend):
    batch, length, hidden_size, vocab = 2, 7, 12, 97
    hidden, weight, bias, labels = make_hidden_case(batch, length, hidden_size, vocab)
    old, adv, mask, _ = rollout(batch, length)
    ref = old + 0.5
    result = linear_ppo_policy_loss(
        hidden,
        weight,
        labels,
        old,
        adv,
        mask,
        bias=bias,
        ref_logprobs=ref,
        kl_estimator="k1",
        compute_entropy=True,
        backend=backend,
    )
    lp, ent = eager_logprobs_from_hidden(hidden.double(), weight.double(), labels, bias.double())
    valid = (mask & (labels != -100)).double()
    assert_close_fp32("entropy", result.entropy, (ent * valid).sum() / valid.sum(), rtol=1e-5)
    assert_close_fp32("ref_kl", result.ref_kl, ((lp - ref.double()) * valid).sum() / valid.sum(), rtol=1e-5)
    quiet = linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask, bias=bias, backend=backend)
    assert quiet.entropy is None and quiet.ref_kl is None


def _edge_case(name):
    """A small fused-loss call (B=3, T=5, H=12, V=37) with one edge of the input space: returns the inputs,
    the keyword arguments, which leaves need a gradient, and the upstream gradient."""
    hidden, weight, bias, labels = make_hidden_case(3, 5, 12, 37)
    old, adv, mask = -torch.rand(3, 5) * 4, torch.randn(3, 5), torch.rand(3, 5) > 0.3
    if name == "no rows":
        hidden, labels, old, adv, mask = hidden[:0], labels[:0], old[:0], adv[:0], mask[:0]
    kwargs, needs, upstream = {}, (True, True, True), 1.0
    if name == "all masked":
        mask[:] = False
    elif name == "all labels ignored":
        labels[:] = -100
    elif name == "frozen lm_head":
        needs = (True, False, False)
    elif name == "lm_head only":
        needs = (False, True, True)
    elif name == "no bias":
        bias = None
    elif name == "1-D tokens, one row per chunk":
        hidden, labels, old, adv, mask = hidden[0], labels[0], old[0], adv[0], mask[0]
        kwargs = dict(chunk_size=1)
    elif name == "scaled upstream gradient, seq-mean":
        kwargs, upstream = dict(loss_agg="seq-mean-token-mean", chunk_size=2), 2.5
    elif name == "extreme ratios and advantages":
        old, adv = old * 50, adv * 1e4
        kwargs = dict(dual_clip=3.0, chunk_size=4)
    return (hidden, weight, bias, labels, old, adv, mask), kwargs, needs, upstream


EDGE_CASES = [
    "no rows",
    "all masked",
    "all labels ignored",
    "frozen lm_head",
    "lm_head only",
    "no bias",
    "1-D tokens, one row per chunk",
    "scaled upstream gradient, seq-mean",
    "extreme ratios and advantages",
]


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
@pytest.mark.parametrize("name", EDGE_CASES)
def test_hidden_form_edge_cases_match_float64(backend, name):
    """Empty inputs, nothing valid, frozen or absent parameters, one-dimensional tokens, a scaled loss and
    extreme values: loss, stats, log-probs and gradients against the float64 reference."""
    (hidden, weight, bias, labels, old, adv, mask), kwargs, needs, upstream = _edge_case(name)

    def run(dtype, run_backend):
        leaves = [
            None if t is None else t.detach().to(dtype).requires_grad_(need)
            for t, need in zip((hidden, weight, bias), needs, strict=True)
        ]
        result = linear_ppo_policy_loss(
            leaves[0], leaves[1], labels, old, adv, mask, bias=leaves[2], backend=run_backend, **kwargs
        )
        (upstream * result.loss).backward()
        return result, [None if t is None or not t.requires_grad else t.grad for t in leaves]

    got, got_grads = run(torch.float32, backend)
    want, want_grads = run(torch.float64, "torch")
    # fp32 rounds each token's term, not the mean they cancel to: with advantages of 1e4 the terms reach
    # |A|·max(1 + clip, dual_clip) ~ 5e4 and sum to ~15, so the bound grows with the terms' size.
    valid = mask.bool() & (labels != -100)
    term_bound = max(1.0 + kwargs.get("clip_eps", 0.2), kwargs.get("dual_clip") or 0.0)
    mean_term = float((adv.double().abs() * term_bound)[valid].mean()) if bool(valid.any()) else 0.0
    loss_atol = 1e-6 + 4 * torch.finfo(torch.float32).eps * mean_term
    assert_close_fp32("loss", got.loss, want.loss, rtol=1e-5, atol=loss_atol)
    assert_close_fp32("clip_fraction", got.clip_fraction, want.clip_fraction)
    assert_close_fp32("approx_kl", got.approx_kl, want.approx_kl, rtol=1e-5, atol=1e-5)
    assert_close_fp32("logprobs", got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    for leaf, g, w in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        assert (g is None) == (w is None), leaf
        if g is not None:
            assert g.shape == w.shape
            assert_close_fp32(f"grad {leaf}", g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_hidden_form_gradients_survive_in_place_changes_between_retained_passes(backend):
    """A returned gradient is the caller's to change: clipping it in place between two backward passes of
    a retained graph leaves the second pass's gradient intact."""
    hidden, weight, bias, labels = make_hidden_case(2, 6, 12, 37)
    old, adv, mask, _ = rollout(2, 6)
    weight.requires_grad_(True)
    result = linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask, bias=bias, backend=backend)
    (first,) = torch.autograd.grad(result.loss, weight, retain_graph=True)
    want = first.clone()
    first.mul_(0.0)
    (second,) = torch.autograd.grad(result.loss, weight)
    torch.testing.assert_close(second, want, rtol=0, atol=0)


def test_hidden_form_without_grad_skips_gradients():
    hidden, weight, bias, labels = make_hidden_case(2, 5, 8, 50)
    old, adv, mask, _ = rollout(2, 5)
    with torch.no_grad():
        result = linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask, bias=bias)
    assert not result.loss.requires_grad and torch.isfinite(result.loss)


# --------------------------------------------------------------------------------- value loss


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_eager_float64(clip):
    values_old = torch.randn(6, 15)
    values = values_old + torch.randn(6, 15) * 0.4
    returns = values_old + torch.randn(6, 15)
    _, _, mask, _ = rollout(6, 15)
    v = values.clone().requires_grad_(True)
    result = value_loss(v, values_old, returns, mask, clip=clip)
    result.loss.backward()
    v64 = values.double().requires_grad_(True)
    loss, clip_fraction = eager_value_loss(v64, values_old.double(), returns.double(), mask, clip or math.inf)
    loss.backward()
    assert_close_fp32("value loss", result.loss, loss, rtol=1e-5, atol=1e-7)
    assert_close_fp32("grad values", v.grad, v64.grad, rtol=1e-5, atol=1e-8)
    if clip is None:
        assert float(result.clip_fraction) == 0.0
    else:
        assert 0 < float(clip_fraction) < 1
        assert_close_fp32("clip_fraction", result.clip_fraction, clip_fraction)


def test_value_loss_seq_mean_and_empty_rows():
    values = torch.randn(3, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6])
    returns = torch.randn(3, 6)
    result = value_loss(values, values.detach(), returns, mask, loss_agg="seq-mean-token-mean")
    err = 0.5 * (values.detach().double() - returns.double()) ** 2
    expected = (err[0, :3].mean() + err[1, 0]) / 2
    assert_close_fp32("loss", result.loss, expected, rtol=1e-6)


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(clip_eps=0.0), "clip_eps"),
        (dict(clip_eps=1.5), "clip_eps"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(kl_estimator="k4"), "estimator"),
        (dict(loss_agg="sum"), "loss_agg"),
        (dict(kl_coef=float("nan")), "kl_coef"),
    ],
)
def test_bad_options_name_the_argument(change, message):
    old, adv, mask, _ = rollout(2, 4)
    with pytest.raises(ValueError, match=message):
        ppo_policy_loss(old.clone(), old, adv, mask, **change)
    hidden, weight, _, labels = make_hidden_case(2, 4, 8, 20)
    with pytest.raises(ValueError, match=message):
        linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask, **change)


def test_bad_shapes_name_the_argument():
    old, adv, mask, _ = rollout(2, 4)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(old, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        ppo_policy_loss(
            old.reshape(-1),
            old.reshape(-1),
            adv.reshape(-1),
            mask.reshape(-1),
            loss_agg="seq-mean-token-mean",
        )
    hidden, weight, _, labels = make_hidden_case(2, 4, 8, 20)
    with pytest.raises(ValueError, match="mask"):
        linear_ppo_policy_loss(hidden, weight, labels, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="returns"):
        value_loss(old, old, adv[:1], mask)
