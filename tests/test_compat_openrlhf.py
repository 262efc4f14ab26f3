"""fastrlhf.compat.openrlhf against eager re-statements of OpenRLHF's published semantics, and patch().

OpenRLHF cannot be installed here (it pulls in ray, vLLM and DeepSpeed), so each peer function is restated
below from its source, with file and function named; the patch tests use stand-in modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_fp32, assert_no_nan, assert_within_2x

from fastrlhf.compat import openrlhf as compat

# ------------------------------------------------------------------------------- OpenRLHF, restated


def openrlhf_log_probs_from_logits(logits, labels, temperature=1.0):
    """openrlhf/models/utils.py, log_probs_from_logits without flash-attn: logits divided by the temperature
    (OpenRLHF divides the caller's tensor in place; here a new tensor), then for float32/float64 the label's
    logit minus a logsumexp taken over chunks of rows, and for other dtypes log_softmax row by row."""
    logits = logits / temperature
    if logits.dtype in (torch.float32, torch.float64):
        flat = logits.reshape(-1, logits.shape[-1])
        lse = torch.cat([torch.logsumexp(chunk, -1) for chunk in flat.split(4)]).view(logits.shape[:-1])
        return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    rows = [
        torch.log_softmax(r, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
        for r, lab in zip(logits, labels, strict=True)
    ]
    return torch.stack(rows)


def openrlhf_compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    """openrlhf/models/utils.py, compute_approx_kl (releases with the clamp): in float32, k1 = p - q,
    k2 = (p - q)²/2, k3 = exp(q - p) - 1 - (q - p), then every estimate clamped to [-10, 10]."""
    log_ratio = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif kl_estimator == "k3":
        log_ratio = (-log_ratio).exp() - 1 + log_ratio
    return log_ratio.clamp(min=-10, max=10)


def openrlhf_gae(values, rewards, action_mask, gamma, lambd):
    """openrlhf/trainer/ppo_utils/experience_maker.py, get_advantages_and_returns: values and rewards times
    the action mask, then the reverse loop over every position with next value 0 past the end;
    returns = advantages + (masked) values."""
    if action_mask is not None:
        values, rewards = action_mask * values, action_mask * rewards
    running, out = 0.0, []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t < length - 1 else 0.0
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lambd * running
        out.append(running)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def openrlhf_pairwise(chosen, reject, margin=None):
    """openrlhf/models/loss.py, PairWiseLoss.forward."""
    gap = chosen - reject if margin is None else chosen - reject - margin
    return (-F.logsigmoid(gap)).mean()


def openrlhf_logexp(chosen, reject, margin=None):
    """openrlhf/models/loss.py, LogExpLoss.forward (margin unused)."""
    return torch.log(1 + torch.exp(reject - chosen)).mean()


# ------------------------------------------------------------------------------ log_probs_from_logits


@pytest.mark.parametrize("lead,vocab", [((1, 1), 1), ((3, 7), 129), ((2, 9), 4099)], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_from_logits_matches_openrlhf(lead, vocab, temperature):
    logits = torch.randn(*lead, vocab, dtype=torch.float64) * 3
    if vocab > 2:
        logits[..., 2] = float("-inf")
        logits[0, 0, 0] = -1e4
    labels = torch.randint(0, vocab, lead)
    labels[labels == 2] = 1
    g = torch.randn(lead, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    want = openrlhf_log_probs_from_logits(x, labels, temperature)
    (want_grad,) = torch.autograd.grad((want * g).sum(), x)

    ours = logits.float().requires_grad_(True)
    before = ours.detach().clone()
    got = compat.log_probs_from_logits(ours, labels, temperature)
    (got * g.float()).sum().backward()
    assert torch.equal(ours.detach(), before)  # unlike OpenRLHF's div_, the caller's logits stay as they were
    assert_close_fp32("logprobs", got, want, rtol=2e-5, atol=2e-4)
    assert_close_fp32("d logits", ours.grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_log_probs_low_precision_within_2x(dtype):
    logits = (torch.randn(3, 5, 3001) * 4).to(dtype)
    labels = torch.randint(0, 3001, (3, 5))
    want = openrlhf_log_probs_from_logits(logits.double(), labels, 0.7)
    got = compat.log_probs_from_logits(logits, labels, 0.7)
    assert_within_2x("logprobs", got, want, openrlhf_log_probs_from_logits(logits, labels, 0.7))


# --------------------------------------------------------------------------------- compute_approx_kl


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_matches_openrlhf(estimator):
    logp = -torch.rand(6, 19, dtype=torch.float64) * 5
    base = logp + torch.randn(6, 19, dtype=torch.float64)
    base.view(-1)[:4] = logp.view(-1)[:4] + torch.tensor([30.0, -30.0, 1e4, -1e4], dtype=torch.float64)
    a, b = logp.clone().requires_grad_(True), base.clone().requires_grad_(True)
    want = openrlhf_compute_approx_kl(a.double(), b.double(), estimator).double()
    # Redo in float64 for the reference gradient (OpenRLHF's .float() would round it).
    want = (
        (a - b)
        if estimator == "k1"
        else ((a - b) ** 2 / 2 if estimator == "k2" else (b - a).exp() - 1 + (a - b))
    ).clamp(-10, 10)
    g = torch.randn_like(logp)
    want_da, want_db = torch.autograd.grad((want * g).sum(), (a, b))

    x, y = logp.float().requires_grad_(True), base.float().requires_grad_(True)
    got = compat.compute_approx_kl(x, y, kl_estimator=estimator)
    (got * g.float()).sum().backward()
    assert got.dtype == torch.float32
    assert_close_fp32("kl", got, want, rtol=2e-5, atol=2e-4)
    # OpenRLHF's own autograd is NaN where exp(q - p) overflows under the clamp; the kernel gives 0 there.
    peer_finite = torch.isfinite(want_da)
    for what, grad, want_grad in (("d log_probs", x.grad, want_da), ("d base", y.grad, want_db)):
        assert_no_nan(what, grad)
        assert_close_fp32(what, grad[peer_finite], want_grad[peer_finite], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_infinities_and_low_precision(estimator):
    logp = torch.tensor([float("-inf"), -1.0, -2.0, float("nan")])
    base = torch.tensor([-1.0, float("-inf"), -2.5, -1.0])
    got, want = (
        compat.compute_approx_kl(logp, base, estimator),
        openrlhf_compute_approx_kl(logp, base, estimator),
    )
    if estimator == "k3":
        # k3 at logp = -inf: OpenRLHF computes inf - inf = NaN; the estimate is +inf, so we give the clamp.
        assert torch.isnan(want[0]) and got[0] == 10.0
        got, want = got[1:], want[1:]
    torch.testing.assert_close(got, want, equal_nan=True)  # NaN input stays NaN, as in OpenRLHF
    lp = (-torch.rand(4, 33) * 4).bfloat16()
    bs = (lp.double() + torch.randn(4, 33)).bfloat16()
    want = openrlhf_compute_approx_kl(lp.double(), bs.double(), estimator)
    got = compat.compute_approx_kl(lp, bs, estimator)
    assert got.dtype == torch.float32  # .float() first, as OpenRLHF does
    # Both sides compute in float32 from the bf16 inputs, so the floor is float32 rounding of the result.
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, float(want.abs().max()))
    assert_within_2x("kl", got, want, openrlhf_compute_approx_kl(lp, bs, estimator), floor=floor)


def test_compute_approx_kl_errors_and_old_action_mask():
    logp, base = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        compat.compute_approx_kl(logp, base, "abs")
    mask = torch.rand(2, 5) > 0.5
    got = compat.compute_approx_kl(logp, base, "k3", action_mask=mask)
    want = torch.where(mask, openrlhf_compute_approx_kl(logp, base, "k3"), 0.0)
    assert_close_fp32("masked kl", got, want)


# ------------------------------------------------------------------------------------------------ GAE


def action_masks(batch, length):
    """Right padding (the usual), a prompt-side left zero run, holes, and an all-zero row."""
    m = torch.rand(batch, length) > 0.3
    m[0] = torch.arange(length) < length - 4
    m[1] = (torch.arange(length) >= 3) & (torch.arange(length) < length - 1)
    m[2] = False
    return m


@pytest.mark.parametrize("gamma,lambd", [(1.0, 0.95), (0.99, 1.0), (0.5, 0.0)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_gae_matches_openrlhf_everywhere(gamma, lambd, mask_kind):
    batch, length = 5, 21
    values = torch.randn(batch, length, dtype=torch.float64)
    rewards = torch.randn(batch, length, dtype=torch.float64)
    rewards[0, 10] = 1e4
    mask = action_masks(batch, length)
    mask = {"bool": mask, "float": mask.double(), "none": None}[mask_kind]
    want_adv, want_ret = openrlhf_gae(values, rewards, mask, gamma, lambd)
    got_mask = None if mask is None else mask.float() if mask_kind == "float" else mask
    adv, ret = compat.get_advantages_and_returns(values.float(), rewards.float(), got_mask, gamma, lambd)
    # Every position, masked ones included: OpenRLHF's loop runs over all of them.
    assert_close_fp32("advantages", adv, want_adv, rtol=2e-5, atol=2e-3)
    assert_close_fp32("returns", ret, want_ret, rtol=2e-5, atol=2e-3)
    adv64, ret64 = compat.get_advantages_and_returns(values, rewards, mask, gamma, lambd)
    torch.testing.assert_close(adv64, want_adv, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ret64, want_ret, rtol=1e-12, atol=1e-9)


def test_gae_padding_garbage_does_not_leak():
    """NaN in masked values/rewards: OpenRLHF's mask product keeps it (NaN·0); here it stays out."""
    values, rewards = torch.randn(2, 8), torch.randn(2, 8)
    mask = torch.arange(8).expand(2, 8) < torch.tensor([[5], [8]])
    values[0, 6], rewards[0, 7] = float("nan"), float("inf")
    clean_v, clean_r = torch.where(mask, values, 0.0), torch.where(mask, rewards, 0.0)
    adv, ret = compat.get_advantages_and_returns(values, rewards, mask, 1.0, 0.95)
    want_adv, want_ret = openrlhf_gae(clean_v.double(), clean_r.double(), mask.double(), 1.0, 0.95)
    assert_close_fp32("advantages", adv, want_adv)
    assert_close_fp32("returns", ret, want_ret)


def test_gae_packed_samples_match_per_sample_loop():
    """Older OpenRLHF (packing_samples) passes lists of 1-D tensors and loops per sample."""
    lengths = [7, 1, 12]
    values = [torch.randn(n) for n in lengths]
    rewards = [torch.randn(n) for n in lengths]
    masks = [torch.rand(n) > 0.2 for n in lengths]
    for action_mask in (None, masks):
        adv, ret = compat.get_advantages_and_returns(values, rewards, action_mask, 0.99, 0.9)
        for i, n in enumerate(lengths):
            m = None if action_mask is None else masks[i][None].double()
            want_adv, want_ret = openrlhf_gae(
                values[i][None].double(), rewards[i][None].double(), m, 0.99, 0.9
            )
            assert adv[i].shape == (n,)
            assert_close_fp32(f"advantages[{i}]", adv[i], want_adv[0])
            assert_close_fp32(f"returns[{i}]", ret[i], want_ret[0])


# -------------------------------------------------------------------------------------- reward losses


@pytest.mark.parametrize("shape", [(1,), (37,), (4, 6)], ids=str)
@pytest.mark.parametrize("margin_kind", ["none", "tensor"])
def test_pairwise_and_logexp_losses_match_openrlhf(shape, margin_kind):
    chosen = torch.randn(shape, dtype=torch.float64) * 3
    reject = torch.randn(shape, dtype=torch.float64) * 3
    margin = None if margin_kind == "none" else torch.rand(shape, dtype=torch.float64)
    for ours, peer in ((compat.PairWiseLoss(), openrlhf_pairwise), (compat.LogExpLoss(), openrlhf_logexp)):
        c, r = chosen.clone().requires_grad_(True), reject.clone().requires_grad_(True)
        want = peer(c, r, margin)
        want_dc, want_dr = torch.autograd.grad(want, (c, r))
        c32, r32 = chosen.float().requires_grad_(True), reject.float().requires_grad_(True)
        got = ours(c32, r32, None if margin is None else margin.float())
        got.backward()
        assert got.shape == ()
        assert_close_fp32(type(ours).__name__, got, want)
        assert_close_fp32("d chosen", c32.grad, want_dc)
        assert_close_fp32("d reject", r32.grad, want_dr)


def test_reward_losses_at_huge_gaps():
    """Gaps of ±1e4: OpenRLHF's LogExpLoss overflows to inf; both modules here give the exact value."""
    chosen = torch.tensor([1e4, -1e4, 0.5], dtype=torch.float64)
    reject = torch.tensor([-1e4, 1e4, 0.0], dtype=torch.float64)
    truth = F.softplus(reject - chosen).mean()
    assert torch.isinf(openrlhf_logexp(chosen, reject))
    for module in (compat.PairWiseLoss(), compat.LogExpLoss()):
        c = chosen.float().requires_grad_(True)
        loss = module(c, reject.float())
        loss.backward()
        assert_close_fp32(type(module).__name__, loss, truth)
        assert_no_nan("d chosen", c.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pairwise_low_precision_within_2x(dtype):
    chosen, reject = (torch.randn(257) * 3).to(dtype), (torch.randn(257) * 3).to(dtype)
    want = openrlhf_pairwise(chosen.double(), reject.double())
    assert_within_2x("loss", compat.PairWiseLoss()(chosen, reject), want, openrlhf_pairwise(chosen, reject))


# ------------------------------------------------------------------------------------------------ patch()


def _module(name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


@pytest.fixture
def fake_openrlhf(monkeypatch):
    """Stand-ins for the OpenRLHF modules patch() targets, with sentinel functions and classes."""
    maker_name = "openrlhf.trainer.ppo_utils.experience_maker"

    def log_probs_from_logits(*args, **kwargs):
        return "original log_probs_from_logits"

    def compute_approx_kl(*args, **kwargs):
        return "original compute_approx_kl"

    def gae(self, *args):
        return "original gae"

    class PairWiseLoss:
        pass

    class LogExpLoss:
        pass

    naive = type("NaiveExperienceMaker", (), {"get_advantages_and_returns": gae, "__module__": maker_name})
    remote = type("RemoteExperienceMaker", (naive,), {"__module__": maker_name})
    foreign = type("Foreign", (), {"get_advantages_and_returns": gae, "__module__": "elsewhere"})
    utils = _module(
        "openrlhf.models.utils",
        log_probs_from_logits=log_probs_from_logits,
        compute_approx_kl=compute_approx_kl,
    )
    loss = _module("openrlhf.models.loss", PairWiseLoss=PairWiseLoss, LogExpLoss=LogExpLoss)
    modules = [
        _module("openrlhf"),
        _module("openrlhf.models", PairWiseLoss=PairWiseLoss, LogExpLoss=LogExpLoss),  # the re-export
        utils,
        loss,
        _module("openrlhf.models.actor", log_probs_from_logits=log_probs_from_logits),  # from .utils import
        _module("openrlhf.trainer"),
        _module("openrlhf.trainer.ppo_utils"),
        _module(maker_name, NaiveExperienceMaker=naive, RemoteExperienceMaker=remote, Foreign=foreign),
    ]
    for module in modules:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    yield types.SimpleNamespace(
        gae=gae, naive=naive, remote=remote, foreign=foreign, PairWiseLoss=PairWiseLoss, LogExpLoss=LogExpLoss
    )
    compat.unpatch()


def test_patch_swaps_and_unpatch_restores(fake_openrlhf):
    utils, models = sys.modules["openrlhf.models.utils"], sys.modules["openrlhf.models"]
    actor, loss = sys.modules["openrlhf.models.actor"], sys.modules["openrlhf.models.loss"]
    original_logprobs = utils.log_probs_from_logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = compat.patch()
    assert handle.active
    assert utils.log_probs_from_logits is compat.log_probs_from_logits is actor.log_probs_from_logits
    assert utils.compute_approx_kl is compat.compute_approx_kl
    assert loss.PairWiseLoss is compat.PairWiseLoss is models.PairWiseLoss
    assert loss.LogExpLoss is compat.LogExpLoss is models.LogExpLoss
    # The method on the class that defines it; the subclass inherits it; a class from elsewhere is left.
    assert "get_advantages_and_returns" not in vars(fake_openrlhf.remote)
    assert fake_openrlhf.foreign.get_advantages_and_returns is fake_openrlhf.gae
    values, rewards = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    adv, ret = fake_openrlhf.remote().get_advantages_and_returns(values, rewards, mask, 1.0, 0.95)
    want_adv, want_ret = openrlhf_gae(values.double(), rewards.double(), mask.double(), 1.0, 0.95)
    assert_close_fp32("advantages", adv, want_adv)
    assert_close_fp32("returns", ret, want_ret)

    handle.unpatch()
    assert utils.log_probs_from_logits is original_logprobs is actor.log_probs_from_logits
    assert loss.PairWiseLoss is fake_openrlhf.PairWiseLoss is models.PairWiseLoss
    assert loss.LogExpLoss is fake_openrlhf.LogExpLoss
    assert vars(fake_openrlhf.naive)["get_advantages_and_returns"] is fake_openrlhf.gae
    assert fake_openrlhf.remote().get_advantages_and_returns() == "original gae"


def test_module_level_unpatch(fake_openrlhf):
    compat.patch()
    compat.unpatch()
    assert sys.modules["openrlhf.models.loss"].PairWiseLoss is fake_openrlhf.PairWiseLoss


@pytest.mark.skipif(importlib.util.find_spec("openrlhf") is not None, reason="OpenRLHF is installed here")
def test_patch_without_openrlhf_warns_and_does_nothing():
    with pytest.warns(RuntimeWarning, match="not installed"):
        handle = compat.patch()
    assert not handle.active and handle.patched == []
    with handle:  # a no-op handle still works as a context manager
        pass
