"""fastrlhf.compat.verl against eager re-statements of veRL's published semantics, and patch() mechanics.

veRL cannot be installed here (it pulls in ray, vLLM and DeepSpeed), so each peer function is restated
below from its source, with file and function named; the patch tests use stand-in modules.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from loops import (
    verl_grpo,
    verl_masked_whiten,
    verl_reinforce_pp,
    verl_reinforce_pp_baseline,
    verl_rloo,
)
from numerics import assert_close_fp32, assert_within_2x

from fastrlhf.compat import verl as compat

# ----------------------------------------------------------------------------------- veRL, restated


def verl_logprobs_from_logits(logits, labels):
    """verl/utils/torch_functional.py, logprobs_from_logits without flash-attn, i.e. logprobs_from_logits_v2:
    float32/float64 take the label's logit minus each row's logsumexp; other dtypes run log_softmax row by
    row in their own dtype and gather."""
    if logits.dtype in (torch.float32, torch.float64):
        label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return label_logit - torch.stack([torch.logsumexp(row, -1) for row in logits])
    rows = [
        torch.log_softmax(r, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
        for r, lab in zip(logits, labels, strict=True)
    ]
    return torch.stack(rows)


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl/trainer/ppo/core_algos.py, compute_gae_advantage_return: walk t backwards; a masked step keeps
    the next value and the running advantage; advantages everywhere (masked ones carry the running value),
    returns = advantages + values, then the advantages are whitened over the mask."""
    mask = response_mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(values.shape[1])):
        delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        running = step * mask[:, t] + (1 - mask[:, t]) * running
        out.append(running)
    advantages = torch.stack(out[::-1], dim=1)
    return verl_masked_whiten(advantages, response_mask), advantages + values


def verl_kl_penalty(logprob, ref_logprob, name):
    """verl/trainer/ppo/core_algos.py, kl_penalty and kl_penalty_forward: the estimators by name; low_var_kl
    clamps ref - logp to [-20, 20] before exp and the result to [-10, 10]; a trailing "+" keeps the value
    and takes the k2 gradient (straight-through)."""
    base = name[:-1] if name.endswith("+") else name
    diff = logprob - ref_logprob
    if base in ("kl", "k1"):
        value = diff
    elif base == "abs":
        value = diff.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * diff.square()
    elif base in ("low_var_kl", "k3"):
        log_ratio = (ref_logprob - logprob).clamp(-20, 20)
        value = (torch.exp(log_ratio) - log_ratio - 1).clamp(-10, 10)
    else:
        raise NotImplementedError(name)
    if not name.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = 0.5 * diff.square()
    return k2 - k2.detach() + value.detach()


# ------------------------------------------------------------------------------ logprobs_from_logits


@pytest.mark.parametrize("lead,vocab", [((1,), 1), ((7,), 33), ((3, 5), 1001), ((2,), 70001)], ids=str)
def test_logprobs_from_logits_matches_verl(lead, vocab):
    logits = torch.randn(*lead, vocab, dtype=torch.float64) * 3
    if vocab > 2:
        logits[..., 1] = float("-inf")
        logits.view(-1)[0] = 1e4
    labels = torch.randint(0, vocab, lead)
    labels[labels == 1] = 0
    g = torch.randn(lead, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    want = verl_logprobs_from_logits(x, labels)
    (want_grad,) = torch.autograd.grad((want * g).sum(), x)

    leaf = logits.float().requires_grad_(True)
    got = compat.logprobs_from_logits(leaf * 1.0, labels)  # a non-leaf, as model outputs are
    (got * g.float()).sum().backward()
    assert_close_fp32("logprobs", got, want, rtol=2e-5, atol=2e-4)
    assert_close_fp32("d logits", leaf.grad, want_grad)


@pytest.mark.parametrize("inplace", [True, False])
def test_inplace_backward_reuses_the_logits_buffer(inplace):
    """inplace_backward=True writes d(logits) into the logits buffer, as veRL's flash-attn path does."""
    leaf = torch.randn(6, 50, requires_grad=True)
    logits = leaf * 2.0
    kept = logits.detach().clone()
    labels = torch.randint(0, 50, (6,))
    compat.logprobs_from_logits(logits, labels, inplace_backward=inplace).sum().backward()
    want = (
        torch.softmax(kept.double(), -1)
        .neg()
        .scatter_add(-1, labels[:, None], torch.ones(6, 1, dtype=torch.float64))
    )
    assert_close_fp32("d leaf", leaf.grad, 2.0 * want)
    if inplace:
        assert_close_fp32("logits buffer", logits.detach(), want)
    else:
        assert torch.equal(logits.detach(), kept)


def test_ignore_index_gives_zero_like_flash_attn():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4))
    labels[1, 2:] = -100
    out = compat.logprobs_from_logits(logits, labels, inplace_backward=False)
    out.sum().backward()
    assert torch.all(out[1, 2:] == 0) and torch.all(logits.grad[1, 2:] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_low_precision_within_2x(dtype):
    logits = (torch.randn(4, 3, 2003) * 4).to(dtype)
    labels = torch.randint(0, 2003, (4, 3))
    want = verl_logprobs_from_logits(logits.double(), labels)
    assert_within_2x(
        "logprobs",
        compat.logprobs_from_logits(logits, labels),
        want,
        verl_logprobs_from_logits(logits, labels),
    )


# ------------------------------------------------------------------------------------------------ GAE


def masks(batch, length):
    """Right padding, left padding, holes and a single-token row, in one batch."""
    m = torch.rand(batch, length) > 0.25
    m[0] = torch.arange(length) < length - 3
    m[1] = torch.arange(length) >= 2
    m[2] = False
    m[2, length // 2] = True
    return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_gae_matches_verl_on_response_tokens(gamma, lam, mask_dtype):
    batch, length = 6, 23
    rewards = torch.randn(batch, length, dtype=torch.float64)
    rewards[3, 4] = 1e4  # a huge score
    values = torch.randn(batch, length, dtype=torch.float64)
    mask = masks(batch, length)
    want_adv, want_ret = verl_gae(rewards, values, mask.to(torch.float64), gamma, lam)

    adv, ret = compat.compute_gae_advantage_return(
        rewards.float(), values.float(), mask.to(mask_dtype), torch.tensor(gamma), torch.tensor(lam)
    )
    assert adv.shape == ret.shape == (batch, length)
    # veRL leaves its running value at masked steps (every consumer masks them); here they are 0.
    assert_close_fp32("advantages", adv[mask], want_adv[mask], rtol=1e-4, atol=1e-4)
    assert_close_fp32("returns", ret[mask], want_ret[mask], rtol=2e-5, atol=2e-3)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_gae_float64_is_exact_and_needs_two_tokens():
    rewards, values = torch.randn(3, 9, dtype=torch.float64), torch.randn(3, 9, dtype=torch.float64)
    mask = masks(3, 9)
    adv, ret = compat.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    want_adv, want_ret = verl_gae(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv[mask], want_adv[mask], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(ret[mask], want_ret[mask], rtol=1e-12, atol=1e-12)
    one = torch.zeros(3, 9, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="at least 2"):  # veRL's masked_var raises too
        compat.compute_gae_advantage_return(rewards, values, one, 1.0, 0.95)


# ------------------------------------------------------------------------------------------- KL penalty

NAMES = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]


def kl_inputs(shape):
    """Log-probs with ordinary gaps and gaps past the clamps (±30, ±1e4)."""
    logp = -torch.rand(shape, dtype=torch.float64) * 5
    ref = logp + torch.randn(shape, dtype=torch.float64)
    ref.view(-1)[:4] = logp.view(-1)[:4] + torch.tensor([30.0, -30.0, 1e4, -1e4], dtype=torch.float64)
    return logp, ref


@pytest.mark.parametrize("name", NAMES + [n + "+" for n in NAMES])
def test_kl_penalty_matches_verl(name):
    logp, ref = kl_inputs((5, 17))
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    want = verl_kl_penalty(a, b, name)
    g = torch.randn_like(logp)
    want_da, want_db = torch.autograd.grad((want * g).sum(), (a, b))

    x, y = logp.float().requires_grad_(True), ref.float().requires_grad_(True)
    got = compat.kl_penalty(x, y, name)
    (got * g.float()).sum().backward()
    assert got.dtype == torch.float32 and got.shape == logp.shape
    # 1e4² / 2 in fp32 carries fp32's relative error; rtol covers it.
    assert_close_fp32("kl", got, want, rtol=2e-5, atol=2e-4)
    assert_close_fp32("d logprob", x.grad, want_da, rtol=2e-5, atol=2e-4)
    assert_close_fp32("d ref", y.grad, want_db, rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_kl_penalty_infinite_inputs_match_verl(name):
    """-inf log-probs: ±inf where veRL gives ±inf, the clamp where it clamps (low_var_kl: 10)."""
    logp = torch.tensor([float("-inf"), -1.0, -3.0], dtype=torch.float64)
    ref = torch.tensor([-2.0, float("-inf"), -1.0], dtype=torch.float64)
    want = verl_kl_penalty(logp, ref, name)
    got = compat.kl_penalty(logp.float(), ref.float(), name)
    assert_close_fp32(name, got, want)


def test_low_var_kl_at_infinities():
    """logp = -inf: 10 with zero gradient, as veRL (its inner clamp); both -inf and NaN in: NaN, as veRL."""
    logp = torch.tensor([float("-inf"), float("-inf"), float("nan"), -1.0], requires_grad=True)
    ref = torch.tensor([-2.0, float("-inf"), -1.0, float("nan")], requires_grad=True)
    kl = compat.kl_penalty(logp, ref, "low_var_kl")
    kl[0].backward()
    assert kl[0] == 10 and logp.grad[0] == 0 and ref.grad[0] == 0
    assert torch.isnan(kl[1:]).all()  # -inf - (-inf) has no log-ratio; veRL gives NaN too


def test_kl_penalty_forward_and_errors():
    logp, ref = kl_inputs((3, 11))
    for name in NAMES:
        assert_close_fp32(
            name,
            compat.kl_penalty_forward(logp.float(), ref.float(), name),
            verl_kl_penalty(logp, ref, name),
            atol=2e-4,
        )
    for bad in ("full", "k4", "low_var_kl++"):
        with pytest.raises(NotImplementedError):
            compat.kl_penalty(logp, ref, bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["k1", "k2", "low_var_kl"])
def test_kl_low_precision_within_2x(dtype, name):
    logp = (-torch.rand(4, 64) * 5).to(dtype)
    ref = (logp.double() + torch.randn(4, 64) * 0.5).to(dtype)
    want = verl_kl_penalty(logp.double(), ref.double(), name)
    assert_within_2x(name, compat.kl_penalty(logp, ref, name), want, verl_kl_penalty(logp, ref, name))


# ------------------------------------------------------------------------------------- outcome estimators


def outcome_batch(sizes, length, order="contiguous"):
    """veRL's inputs for prompts with ``sizes`` responses each: dense random token rewards (veRL's score
    is their sum, padding included), right-padded float masks with at least one token, and ``index``
    (uid strings), with the rows in prompt order, or shuffled."""
    n = sum(sizes)
    lengths = torch.randint(1, length + 1, (n,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    rewards = torch.randn(n, length, dtype=torch.float64) * 0.3
    rewards[torch.rand(n) < 0.3] = 0.0  # all-zero rows: ties inside groups
    index = np.repeat(np.array([f"uid-{i}" for i in range(len(sizes))], dtype=object), sizes)
    if order == "shuffled":
        perm = torch.randperm(n)
        mask, rewards, index = mask[perm], rewards[perm], index[perm.numpy()]
    return rewards, mask, index


GROUPED = {
    "grpo": (compat.compute_grpo_outcome_advantage, verl_grpo),
    "rloo": (compat.compute_rloo_outcome_advantage, verl_rloo),
    "reinforce_plus_plus_baseline": (
        compat.compute_reinforce_plus_plus_baseline_outcome_advantage,
        verl_reinforce_pp_baseline,
    ),
}


@pytest.mark.parametrize("name", list(GROUPED))
@pytest.mark.parametrize(
    "sizes,order",
    [([4] * 6, "contiguous"), ([4] * 6, "shuffled"), ([1] * 5, "contiguous"), ([3, 1, 5, 2, 2], "shuffled")],
    ids=["contiguous", "shuffled", "groups-of-one", "unequal"],
)
def test_grouped_outcome_estimators_match_verl(name, sizes, order):
    ours, theirs = GROUPED[name]
    rewards, mask, index = outcome_batch(sizes, 13, order)
    want_adv, want_ret = theirs(rewards, mask, index)
    for index_as in (index, list(index), torch.as_tensor([int(i[4:]) for i in index])):
        adv, ret = ours(rewards.float(), mask.float(), index_as, config=None)
        assert adv.shape == ret.shape == rewards.shape and adv.dtype == torch.float32
        assert_close_fp32(f"{name} advantages", adv, want_adv, 2e-5, 2e-5)
        assert_close_fp32(f"{name} returns", ret, want_ret, 2e-5, 2e-5)
    if name == "grpo":
        adv, _ = compat.compute_grpo_outcome_advantage(
            rewards.float(), mask, index, epsilon=0.1, norm_adv_by_std_in_grpo=False
        )
        want, _ = verl_grpo(rewards, mask, index, 0.1, norm_adv_by_std_in_grpo=False)
        assert_close_fp32("dr-grpo", adv, want, 2e-5, 2e-5)


def reinforce_pp_batch(kind, n=7, length=15):
    """Right-padded or holed masks, with an outcome score only or with per-token (KL-like) rewards too."""
    lengths = torch.randint(2, length + 1, (n,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if kind.startswith("holes"):
        mask &= torch.rand(n, length) > 0.25
        mask[:, 0] = True
    rewards = torch.zeros(n, length, dtype=torch.float64)
    last = torch.where(mask, torch.arange(length), -1).amax(1)
    rewards[torch.arange(n), last] = torch.randn(n, dtype=torch.float64) * 2
    if kind.endswith("dense"):
        rewards += -0.05 * torch.rand(n, length, dtype=torch.float64) * mask
    return rewards, mask.double()


@pytest.mark.parametrize("kind", ["outcome", "dense", "holes-outcome", "holes-dense"])
@pytest.mark.parametrize(
    "config,gamma",
    [(None, 1.0), (types.SimpleNamespace(gamma=0.95), 0.95), ({"gamma": 0.9}, 0.9)],
    ids=["no-config", "attribute", "mapping"],
)
def test_reinforce_plus_plus_matches_verl(kind, config, gamma):
    """Every path (the op, GAE with zero values, the restarting loop) against veRL's loop; holes included,
    where veRL restarts its sum at every masked token."""
    rewards, mask = reinforce_pp_batch(kind)
    want_adv, want_ret = verl_reinforce_pp(rewards, mask, gamma)
    adv, ret = compat.compute_reinforce_plus_plus_outcome_advantage(
        rewards.float(), mask, config=config, index=np.arange(rewards.shape[0])
    )
    valid = mask.bool()
    assert_close_fp32("advantages", adv, want_adv, 2e-5, 2e-5)
    assert_close_fp32("returns", ret[valid], want_ret[valid], 2e-5, 2e-5)
    assert torch.all(ret[~valid] == 0)  # veRL keeps its running return there; every consumer masks it


def test_outcome_estimators_edge_cases():
    rewards, mask = torch.randn(4, 6), torch.ones(4, 6)
    with pytest.raises(ValueError, match="index has 3 entries; expected 4"):
        compat.compute_grpo_outcome_advantage(rewards, mask, np.arange(3))
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        compat.compute_grpo_outcome_advantage(rewards, mask, np.array([0, 1, 0, 2]), epsilon=-1.0)
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        compat.compute_rloo_outcome_advantage(rewards, mask * 3, np.zeros(4))
    with pytest.raises(ValueError, match=r"config.gamma must be in \[0, 1\]"):
        compat.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, {"gamma": 2.0})
    # Mixed id types numpy cannot sort; one response token in the batch (veRL's masked_var raises): zeros.
    adv, _ = compat.compute_reinforce_plus_plus_baseline_outcome_advantage(
        rewards, mask, np.array(["a", 1, "a", 1], dtype=object)
    )
    assert torch.isfinite(adv).all()
    one = torch.zeros(4, 6)
    one[2, 3] = 1
    adv, ret = compat.compute_reinforce_plus_plus_outcome_advantage(rewards, one)
    assert torch.all(adv == 0) and ret[2, 3] == rewards[2, 3]
    empty = torch.zeros(0, 6)
    assert compat.compute_grpo_outcome_advantage(empty, empty, np.arange(0))[0].shape == (0, 6)
    assert compat.compute_reinforce_plus_plus_outcome_advantage(empty, empty)[0].shape == (0, 6)


# ------------------------------------------------------------------------------------------------ patch()


def _module(name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


# veRL's ADV_ESTIMATOR_REGISTRY names of the outcome estimators → their functions in core_algos.
OUTCOME = {
    "grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
}


@pytest.fixture
def fake_verl(monkeypatch):
    """Stand-ins for the veRL modules patch() targets, each holding sentinel functions."""

    def sentinel(name):
        def fn(*args, **kwargs):
            return name

        fn.__module__ = "verl.fake"
        return fn

    originals = {
        name: sentinel(name) for name in ("logprobs_from_logits", "gae", "kl_penalty", "kl_forward", *OUTCOME)
    }
    registry = {"gae": originals["gae"], "remax": sentinel("remax")}
    registry |= {name: originals[name] for name in OUTCOME}
    modules = [
        _module("verl"),
        _module("verl.utils"),
        _module("verl.utils.torch_functional", logprobs_from_logits=originals["logprobs_from_logits"]),
        _module("verl.trainer"),
        _module("verl.trainer.ppo"),
        _module(
            "verl.trainer.ppo.core_algos",
            compute_gae_advantage_return=originals["gae"],
            kl_penalty=originals["kl_penalty"],
            kl_penalty_forward=originals["kl_forward"],
            ADV_ESTIMATOR_REGISTRY=registry,
            **{function: originals[name] for name, function in OUTCOME.items()},
        ),
        # dp_actor.py does `from verl.trainer.ppo.core_algos import kl_penalty`: a copy by name.
        _module("verl.workers.actor.dp_actor", kl_penalty=originals["kl_penalty"], unrelated=len),
    ]
    for module in modules:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    yield types.SimpleNamespace(originals=originals, registry=registry, **{m.__name__: m for m in modules})
    compat.unpatch()


def test_patch_swaps_and_unpatch_restores(fake_verl, monkeypatch):
    tf = sys.modules["verl.utils.torch_functional"]
    core = sys.modules["verl.trainer.ppo.core_algos"]
    actor = sys.modules["verl.workers.actor.dp_actor"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is there: no warning
        handle = compat.patch()
    assert handle.active
    assert tf.logprobs_from_logits is compat.logprobs_from_logits
    assert core.compute_gae_advantage_return is compat.compute_gae_advantage_return
    assert core.kl_penalty is compat.kl_penalty and core.kl_penalty_forward is compat.kl_penalty_forward
    assert fake_verl.registry["gae"] is compat.compute_gae_advantage_return  # the estimator registry
    for name, function in OUTCOME.items():
        assert getattr(core, function) is getattr(compat, function)
        assert fake_verl.registry[name] is getattr(compat, function)
    assert fake_verl.registry["remax"]() == "remax"  # estimators fastrlhf has no kernel for stay
    assert actor.kl_penalty is compat.kl_penalty and actor.unrelated is len

    # veRL's call sites now compute: low_var_kl through the kernel.
    kl = core.kl_penalty(torch.zeros(2, 3), torch.full((2, 3), -1.0), "low_var_kl")
    assert_close_fp32("kl", kl, torch.full((2, 3), torch.e**-1, dtype=torch.float64))

    late = _module("verl.workers.critic", kl_penalty=core.kl_penalty)  # imported while patched
    monkeypatch.setitem(sys.modules, late.__name__, late)
    handle.unpatch()
    assert tf.logprobs_from_logits is fake_verl.originals["logprobs_from_logits"]
    assert core.compute_gae_advantage_return is fake_verl.originals["gae"]
    assert core.kl_penalty is fake_verl.originals["kl_penalty"]
    assert core.kl_penalty_forward is fake_verl.originals["kl_forward"]
    assert fake_verl.registry["gae"] is fake_verl.originals["gae"]
    for name, function in OUTCOME.items():
        assert getattr(core, function) is fake_verl.registry[name] is fake_verl.originals[name]
    assert actor.kl_penalty is late.kl_penalty is fake_verl.originals["kl_penalty"]


def test_patch_context_manager_and_older_verl(fake_verl):
    core = sys.modules["verl.trainer.ppo.core_algos"]
    del core.kl_penalty_forward  # older veRL: optional target, skipped without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with compat.patch() as handle:
            assert core.kl_penalty is compat.kl_penalty
            assert not hasattr(core, "kl_penalty_forward")
    assert not handle.active and core.kl_penalty is fake_verl.originals["kl_penalty"]


def test_patch_warns_when_a_module_cannot_be_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", _module("verl"))  # installed, but its submodules fail
    with pytest.warns(RuntimeWarning, match="could not patch"):
        handle = compat.patch()
    assert not handle.active and handle.patched == []


@pytest.mark.skipif(importlib.util.find_spec("verl") is not None, reason="veRL is installed here")
def test_patch_without_verl_warns_and_does_nothing():
    with pytest.warns(RuntimeWarning, match="not installed"):
        handle = compat.patch()
    assert not handle.active and handle.patched == []
    handle.unpatch()
    compat.unpatch()
