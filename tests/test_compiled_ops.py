"""The TORCH_LIBRARY ops of the compiled backends (``torch.ops.fastrlhf.kl_penalty``, ``ranking_loss``,
``gather_logprobs``, ``linear_logprobs``, ``gae``, ``compute_advantages``, ``group_advantages``,
``ppo_policy_loss`` and ``linear_ppo_policy_loss``):
their C++ checks say what the Python checks of the torch backend say, their C++ autograd and fused
reductions match the float64 reference on every gradient shape autograd hands them, their reductions do
not depend on the thread count, and opcheck finds schema, fake (Meta) and autograd registrations
consistent on each device."""

import pytest
import torch
from conftest import DispatchedOps, op_targets
from numerics import assert_close_fp32

from fastrlhf.ops import (
    available_backends,
    compute_advantages,
    gae,
    gather_logprobs,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    linear_ppo_policy_loss,
    ppo_policy_loss,
    ranking_loss,
    reference,
)

COMPILED_TARGETS = [p for p in op_targets(include_torch=False) if p.values[0] in ("cpp", "cuda")]


@pytest.fixture(autouse=True)
def _needs_compiled_kernels():
    if not available_backends()["cpp"].available:
        pytest.skip(f"cpp: {available_backends()['cpp'].reason}")


def _message(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


KL_BAD_CALLS = {
    "estimator": lambda x, b: kl_penalty(x, x, estimator="k4", backend=b),
    "shape": lambda x, b: kl_penalty(x, x.T, backend=b),
    "mask values": lambda x, b: kl_penalty(x, x, torch.full((2, 3), 2), backend=b),
    "complex mask": lambda x, b: kl_penalty(x, x, torch.ones(2, 3, dtype=torch.complex64), backend=b),
    "float mask values": lambda x, b: kl_penalty(x, x, torch.full((2, 3), 0.5), backend=b),
    "whole float mask values": lambda x, b: kl_penalty(x, x, torch.full((2, 3), 2.0), backend=b),
    "mask shape": lambda x, b: kl_penalty(x, x, torch.ones(3, 2, dtype=torch.bool), backend=b),
    "clamp": lambda x, b: kl_penalty(x, x, clamp=-1.5, backend=b),
    "reduction": lambda x, b: kl_penalty(x, x, reduction="sum", backend=b),
    "dtype": lambda x, b: kl_penalty(torch.zeros(2, 3, dtype=torch.long), x, backend=b),
    "device": lambda x, b: kl_penalty(x, x.to("meta"), backend=b),
    "seq-mean of a scalar": lambda x, b: kl_penalty(x[0, 0], x[0, 0], reduction="seq-mean", backend=b),
    # arguments of a type the op's schema does not take: the Python checks name them
    "estimator not a str": lambda x, b: kl_penalty(x, x, estimator=3, backend=b),
    "clamp not a number": lambda x, b: kl_penalty(x, x, clamp="one", backend=b),
}

RANKING_BAD_CALLS = {
    "K=1": lambda r, k, b: ranking_loss(r[:, :1], k[:, :1], backend=b),
    "no pair left": lambda r, k, b: ranking_loss(r, k, torch.tensor([[1, 0, 0, 0]] * 3), backend=b),
    "shape": lambda r, k, b: ranking_loss(r, k[:, :3], backend=b),
    "ranks dtype": lambda r, k, b: ranking_loss(r, k.float(), backend=b),
    "rewards dtype": lambda r, k, b: ranking_loss(k, k, backend=b),
    "1-D rewards": lambda r, k, b: ranking_loss(r[0], k[0], backend=b),
    "mask values": lambda r, k, b: ranking_loss(r, k, torch.full((3, 4), 3), backend=b),
    "margin": lambda r, k, b: ranking_loss(r, k, margin=float("nan"), backend=b),
    "device": lambda r, k, b: ranking_loss(r, k.to("meta"), backend=b),
    "margin not a number": lambda r, k, b: ranking_loss(r, k, margin="wide", backend=b),
}


GATHER_BAD_CALLS = {
    "logits dtype": lambda x, y, b: gather_logprobs(y, y, backend=b),
    "labels dtype": lambda x, y, b: gather_logprobs(x, y.float(), backend=b),
    "labels shape": lambda x, y, b: gather_logprobs(x, y[:3], backend=b),
    "scalar logits": lambda x, y, b: gather_logprobs(x[0, 0], y[0], backend=b),
    "empty vocabulary": lambda x, y, b: gather_logprobs(x[:, :0], y, backend=b),
    "temperature": lambda x, y, b: gather_logprobs(x, y, temperature=0.0, backend=b),
    "infinite temperature": lambda x, y, b: gather_logprobs(x, y, temperature=float("inf"), backend=b),
    "label range": lambda x, y, b: gather_logprobs(x, y.clone().fill_(10), backend=b),
    "device": lambda x, y, b: gather_logprobs(x, y.to("meta"), backend=b),
    "temperature not a number": lambda x, y, b: gather_logprobs(x, y, temperature="hot", backend=b),
}

LINEAR_BAD_CALLS = {
    "hidden dtype": lambda x, w, y, bias, b: linear_logprobs(x.long(), w, y, backend=b),
    "weight dtype": lambda x, w, y, bias, b: linear_logprobs(x, w.double(), y, backend=b),
    "labels dtype": lambda x, w, y, bias, b: linear_logprobs(x, w, y.float(), backend=b),
    "bias dtype": lambda x, w, y, bias, b: linear_logprobs(x, w, y, bias.long(), backend=b),
    "scalar hidden": lambda x, w, y, bias, b: linear_logprobs(x[0, 0], w, y[0], backend=b),
    "1-D weight": lambda x, w, y, bias, b: linear_logprobs(x, w[0], y, backend=b),
    "hidden size": lambda x, w, y, bias, b: linear_logprobs(x, w[:, :-1], y, backend=b),
    "empty vocabulary": lambda x, w, y, bias, b: linear_logprobs(x, w[:0], y, backend=b),
    "labels shape": lambda x, w, y, bias, b: linear_logprobs(x, w, y[:2], backend=b),
    "bias shape": lambda x, w, y, bias, b: linear_logprobs(x, w, y, bias[:-1], backend=b),
    "temperature": lambda x, w, y, bias, b: linear_logprobs(x, w, y, temperature=-1.0, backend=b),
    "chunk_size": lambda x, w, y, bias, b: linear_logprobs(x, w, y, chunk_size=0, backend=b),
    "bool chunk_size": lambda x, w, y, bias, b: linear_logprobs(x, w, y, chunk_size=True, backend=b),
    "label range": lambda x, w, y, bias, b: linear_logprobs(x, w, y.clone().fill_(10), backend=b),
    "label range in a later chunk": lambda x, w, y, bias, b: linear_logprobs(
        x, w, torch.tensor([1, 2, 3, -3]), chunk_size=2, backend=b
    ),
    "device": lambda x, w, y, bias, b: linear_logprobs(x, w, y.to("meta"), backend=b),
    "temperature not a number": lambda x, w, y, bias, b: linear_logprobs(
        x, w, y, temperature="hot", backend=b
    ),
}


GAE_BAD_CALLS = {
    "values dtype": lambda r, v, m, b: gae(r, v.long(), m, 1.0, 0.95, backend=b),
    "rewards dtype": lambda r, v, m, b: gae(r.long(), v, m, 1.0, 0.95, backend=b),
    "1-D values": lambda r, v, m, b: gae(r[0], v[0], m[0], 1.0, 0.95, backend=b),
    "mask shape": lambda r, v, m, b: gae(r, v, m[:, :2], 1.0, 0.95, backend=b),
    "rewards shape": lambda r, v, m, b: gae(r[:2], v, m, 1.0, 0.95, backend=b),
    "mask values": lambda r, v, m, b: gae(r, v, m.long() * 2, 1.0, 0.95, backend=b),
    "float mask values": lambda r, v, m, b: gae(r, v, m.float() * 0.5 + 0.25, 1.0, 0.95, backend=b),
    "complex mask": lambda r, v, m, b: gae(r, v, m.to(torch.complex64), 1.0, 0.95, backend=b),
    "device": lambda r, v, m, b: gae(r, v.to("meta"), m, 1.0, 0.95, backend=b),
    "gamma above 1": lambda r, v, m, b: gae(r, v, m, 1.5, 0.95, backend=b),
    "negative lam": lambda r, v, m, b: gae(r, v, m, 1.0, -0.25, backend=b),
    "infinite gamma": lambda r, v, m, b: gae(r, v, m, float("inf"), 0.95, backend=b),
    "nan lam": lambda r, v, m, b: gae(r, v, m, 1.0, float("nan"), backend=b),
    "gamma not a number": lambda r, v, m, b: gae(r, v, m, "one", 0.95, backend=b),
}


@pytest.mark.parametrize("case", list(GAE_BAD_CALLS))
def test_gae_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    rewards, values, mask = torch.randn(3, 5), torch.randn(3, 5), torch.rand(3, 5) > 0.3
    expected = _message(lambda: GAE_BAD_CALLS[case](rewards, values, mask, "torch"))
    assert _message(lambda: GAE_BAD_CALLS[case](rewards, values, mask, "auto")) == expected


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gae_op_matches_float64_and_tracks_no_gradient(backend, device, dtype):
    """Holes in the mask, an empty row, a row of one token; inputs that require grad give outputs that do
    not (no gradient flows through GAE), as on the torch path."""
    rewards, values = torch.randn(5, 301), torch.randn(5, 301)
    mask = torch.rand(5, 301) > 0.2
    mask[1] = False
    mask[2] = False
    mask[2, 7] = True
    r = rewards.to(device, dtype).requires_grad_(True)
    v = values.to(device, dtype).requires_grad_(True)
    adv, ret = gae(r, v, mask.to(device), 0.99, 0.95, backend=backend)
    assert adv.dtype == ret.dtype == torch.float32 and not adv.requires_grad and not ret.requires_grad
    want_adv, want_ret = reference.gae(r.detach().double(), v.detach().double(), mask.to(device), 0.99, 0.95)
    assert_close_fp32("advantages", adv, want_adv)
    assert_close_fp32("returns", ret, want_ret)


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_gae(backend, device):
    rewards = torch.randn(4, 13, device=device, requires_grad=True)
    values = torch.randn(4, 13, device=device, requires_grad=True)
    for mask in (torch.rand(4, 13, device=device) > 0.3, (torch.rand(4, 13, device=device) > 0.5).float()):
        args = (rewards, values, mask, 0.99, 0.95)
        torch.library.opcheck(torch.ops.fastrlhf.gae.default, args, test_utils=OPCHECK_UTILS)


def _advantages(s, lp, v, m, b, ref=None, **overrides):
    """compute_advantages on (scores, logprobs, ref_logprobs = logprobs + 0.1, values, mask), overridden."""
    kwargs = dict(kl_coef=0.05, estimator="k3", gamma=1.0, lam=0.95, backend=b) | overrides
    return compute_advantages(s, lp, lp + 0.1 if ref is None else ref, v, m, **kwargs)


def _one_token(mask):
    one = torch.zeros_like(mask)
    one[0, 0] = True
    return one


ADVANTAGES_BAD_CALLS = {
    "scores dtype": lambda s, lp, v, m, b: _advantages(s.long(), lp, v, m, b),
    "values dtype": lambda s, lp, v, m, b: _advantages(s, lp, v.long(), m, b),
    "1-D values": lambda s, lp, v, m, b: _advantages(s, lp[0], v[0], m[0], b, ref=lp[0]),
    "logprobs dtype": lambda s, lp, v, m, b: _advantages(s, lp.long(), v, m, b, ref=lp),
    "ref_logprobs dtype": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, ref=lp.long()),
    "mask shape": lambda s, lp, v, m, b: _advantages(s, lp, v, m[:, :2], b),
    "logprobs shape": lambda s, lp, v, m, b: _advantages(s, lp[:, :2], v, m, b, ref=lp),
    "ref_logprobs shape": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, ref=lp[:2]),
    "mask values": lambda s, lp, v, m, b: _advantages(s, lp, v, m.long() * 2, b),
    "scores shape": lambda s, lp, v, m, b: _advantages(s[:2], lp, v, m, b),
    "2-D scores": lambda s, lp, v, m, b: _advantages(s[:, None], lp, v, m, b),
    "device": lambda s, lp, v, m, b: _advantages(s, lp, v.to("meta"), m, b),
    "negative kl_coef": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, kl_coef=-0.5),
    "infinite kl_coef": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, kl_coef=float("inf")),
    "estimator": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, estimator="k4"),
    "kl_clamp": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, kl_clamp=-2.0),
    "integer kl_clamp": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, kl_clamp=0),
    "gamma above 1": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, gamma=1.5),
    "nan lam": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, lam=float("nan")),
    "score_clip": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, score_clip=float("nan")),
    "one valid token to whiten": lambda s, lp, v, m, b: _advantages(s, lp, v, _one_token(m), b),
    "no valid token to whiten": lambda s, lp, v, m, b: _advantages(s, lp, v, m & False, b),
    "empty batch to whiten": lambda s, lp, v, m, b: _advantages(s[:0], lp[:0], v[:0], m[:0], b),
    "kl_coef not a number": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, kl_coef="big"),
    "estimator not a str": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, estimator=1),
    "lam not a number": lambda s, lp, v, m, b: _advantages(s, lp, v, m, b, lam=None),
}


@pytest.mark.parametrize("case", list(ADVANTAGES_BAD_CALLS))
def test_compute_advantages_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    scores, logp, values = torch.randn(3), -torch.rand(3, 5) * 3, torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    expected = _message(lambda: ADVANTAGES_BAD_CALLS[case](scores, logp, values, mask, "torch"))
    assert _message(lambda: ADVANTAGES_BAD_CALLS[case](scores, logp, values, mask, "auto")) == expected


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("whiten", [True, False])
def test_compute_advantages_op_matches_float64_and_tracks_no_gradient(backend, device, dtype, whiten):
    """Holes in the mask, an empty row, a row of one token, clipped scores, a clamped k3; inputs that
    require grad give outputs that do not, as on the torch path. Against the float64 reference composed of
    its own pieces (KL rewards, the score at the last token, GAE, masked whitening)."""
    batch, length = 5, 301
    logp, ref = -torch.rand(batch, length) * 4, -torch.rand(batch, length) * 4
    values, scores = torch.randn(batch, length), torch.randn(batch) * 3
    mask = torch.rand(batch, length) > 0.2
    mask[1] = False
    mask[2] = False
    mask[2, 7] = True
    inputs = [t.to(device, dtype).requires_grad_(True) for t in (scores, logp, ref, values)]
    out = compute_advantages(
        *inputs,
        mask.to(device),
        0.05,
        "k3",
        0.99,
        0.9,
        score_clip=2.5,
        whiten=whiten,
        kl_clamp=3.0,
        backend=backend,
    )
    for name, got in zip(("token_rewards", "advantages", "returns"), out, strict=True):
        assert got.dtype == torch.float32 and not got.requires_grad, name
    s64, lp64, ref64, v64 = (t.detach().double() for t in inputs)
    rewards, advantages, returns = reference.compute_advantages(
        s64.clamp(-2.5, 2.5), lp64, ref64, v64, mask.to(device), 0.05, "k3", 0.99, 0.9, 3.0
    )
    if whiten:
        advantages = reference.masked_whiten(advantages, mask.to(device))
    assert_close_fp32("token_rewards", out.token_rewards, rewards)
    assert_close_fp32("advantages", out.advantages, advantages)
    assert_close_fp32("returns", out.returns, returns)


def test_compute_advantages_whitening_does_not_depend_on_the_thread_count():
    """The whitening's sums run over fixed blocks (here ~50 of them) added in block order."""
    shape = (7, 30011)
    scores, logp, ref, values = (
        torch.randn(7) * 5,
        -torch.rand(shape) * 5,
        -torch.rand(shape) * 5,
        torch.randn(shape),
    )
    mask = torch.rand(shape) > 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compute_advantages(scores, logp, ref, values, mask, 0.1, "k3").advantages
        torch.set_num_threads(max(2, threads))
        many = compute_advantages(scores, logp, ref, values, mask, 0.1, "k3").advantages
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_compute_advantages(backend, device):
    scores = torch.randn(4, device=device, requires_grad=True)
    logp, ref = -torch.rand(4, 13, device=device), -torch.rand(4, 13, device=device)
    values = torch.randn(4, 13, device=device, requires_grad=True)
    for mask in (torch.rand(4, 13, device=device) > 0.3, (torch.rand(4, 13, device=device) > 0.5).float()):
        for options in ((None, True, None), (2.0, False, 1.5)):
            score_clip, whiten, kl_clamp = options
            args = (scores, logp, ref, values, mask, 0.05, "k3", 1.0, 0.95, score_clip, whiten, kl_clamp)
            torch.library.opcheck(
                torch.ops.fastrlhf.compute_advantages.default, args, test_utils=OPCHECK_UTILS
            )


GROUP_BAD_CALLS = {
    "scores dtype": lambda s, m, b: group_advantages(s.long(), m, backend=b),
    "1-D scores": lambda s, m, b: group_advantages(s[0], m, backend=b),
    "k = 0": lambda s, m, b: group_advantages(s[:, :0], m[:, :0], backend=b),
    "3-D mask shape": lambda s, m, b: group_advantages(s, m[:, :2], backend=b),
    "2-D mask rows": lambda s, m, b: group_advantages(s, m.reshape(6, 7)[:5], backend=b),
    "4-D mask": lambda s, m, b: group_advantages(s, m[None], backend=b),
    "estimator": lambda s, m, b: group_advantages(s, m, "ppo", backend=b),
    "rloo of one": lambda s, m, b: group_advantages(s[:, :1], m[:, :1], "rloo", backend=b),
    "device": lambda s, m, b: group_advantages(s, m.to("meta"), backend=b),
    "mask values": lambda s, m, b: group_advantages(s, m.long() * 2, backend=b),
    "gamma": lambda s, m, b: group_advantages(s, m, "reinforce++", gamma=1.5, backend=b),
    "nan eps": lambda s, m, b: group_advantages(s, m, eps=float("nan"), backend=b),
    "negative eps": lambda s, m, b: group_advantages(s, m, eps=-1.0, backend=b),
    "nan score": lambda s, m, b: group_advantages(
        s.index_fill(1, torch.tensor([1]), float("nan")), m, backend=b
    ),
    "inf scores": lambda s, m, b: group_advantages(s.clone().fill_(float("-inf")), m, backend=b),
    "estimator not a str": lambda s, m, b: group_advantages(s, m, 1, backend=b),
    "eps not a number": lambda s, m, b: group_advantages(s, m, eps="small", backend=b),
}


@pytest.mark.parametrize("case", list(GROUP_BAD_CALLS))
def test_group_advantages_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    scores, mask = torch.randn(2, 3), torch.rand(2, 3, 7) > 0.3
    expected = _message(lambda: GROUP_BAD_CALLS[case](scores, mask, "torch"))
    assert _message(lambda: GROUP_BAD_CALLS[case](scores, mask, "auto")) == expected


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++", "reinforce++-baseline"])
def test_group_advantages_op_returns_what_the_torch_path_returns(estimator):
    """Same structure as the torch path: ``returns`` is the advantages tensor itself except for reinforce++;
    float64 reference values; no gradient."""
    scores = (torch.randn(4, 3) * 3).requires_grad_(True)
    mask = torch.rand(4, 3, 50) > 0.2
    mask[1, 2] = False
    got = group_advantages(scores, mask, estimator, gamma=0.95)
    want = group_advantages(scores.double(), mask, estimator, gamma=0.95, backend="torch")
    assert not got.advantages.requires_grad and got.advantages.shape == mask.shape
    assert (got.returns is got.advantages) == (want.returns is want.advantages)
    assert_close_fp32("advantages", got.advantages, want.advantages)
    assert_close_fp32("returns", got.returns, want.returns)


@pytest.mark.parametrize("case", list(GATHER_BAD_CALLS))
def test_gather_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    logits, labels = torch.randn(4, 10), torch.randint(0, 10, (4,))
    expected = _message(lambda: GATHER_BAD_CALLS[case](logits, labels, "torch"))
    assert _message(lambda: GATHER_BAD_CALLS[case](logits, labels, "auto")) == expected


@pytest.mark.parametrize("case", list(LINEAR_BAD_CALLS))
def test_linear_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    hidden, weight = torch.randn(4, 6), torch.randn(10, 6)
    labels, bias = torch.randint(0, 10, (4,)), torch.randn(10)
    expected = _message(lambda: LINEAR_BAD_CALLS[case](hidden, weight, labels, bias, "torch"))
    assert _message(lambda: LINEAR_BAD_CALLS[case](hidden, weight, labels, bias, "auto")) == expected


@pytest.mark.parametrize("case", list(KL_BAD_CALLS))
def test_kl_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    x = torch.randn(2, 3)
    expected = _message(lambda: KL_BAD_CALLS[case](x, "torch"))
    assert _message(lambda: KL_BAD_CALLS[case](x, "auto")) == expected  # the C++ op's own checks


@pytest.mark.parametrize("case", list(RANKING_BAD_CALLS))
def test_ranking_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    rewards, ranks = torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long)
    expected = _message(lambda: RANKING_BAD_CALLS[case](rewards, ranks, "torch"))
    assert _message(lambda: RANKING_BAD_CALLS[case](rewards, ranks, "auto")) == expected


PPO_BAD_CALLS = {
    "clip_eps": lambda x, m, b: ppo_policy_loss(x, x, x, m, clip_eps=1.0, backend=b),
    "clip_eps not positive": lambda x, m, b: ppo_policy_loss(x, x, x, m, clip_eps=-0.1, backend=b),
    "clip_eps_high": lambda x, m, b: ppo_policy_loss(x, x, x, m, clip_eps_high=float("inf"), backend=b),
    "dual_clip": lambda x, m, b: ppo_policy_loss(x, x, x, m, dual_clip=1.0, backend=b),
    "kl_coef": lambda x, m, b: ppo_policy_loss(x, x, x, m, kl_coef=float("inf"), backend=b),
    "entropy_coef": lambda x, m, b: ppo_policy_loss(x, x, x, m, entropy_coef=float("nan"), backend=b),
    "estimator": lambda x, m, b: ppo_policy_loss(x, x, x, m, kl_estimator="k4", backend=b),
    "loss_agg": lambda x, m, b: ppo_policy_loss(x, x, x, m, loss_agg="sum", backend=b),
    "seq-mean of 1-D": lambda x, m, b: ppo_policy_loss(
        x[0], x[0], x[0], m[0], loss_agg="seq-mean-token-mean", backend=b
    ),
    "shape": lambda x, m, b: ppo_policy_loss(x, x, x[:, :2], m, backend=b),
    "mask shape": lambda x, m, b: ppo_policy_loss(x, x, x, m[:1], backend=b),
    "entropy shape": lambda x, m, b: ppo_policy_loss(x, x, x, m, entropy=x.T, backend=b),
    "mask values": lambda x, m, b: ppo_policy_loss(x, x, x, torch.full((2, 3), 2), backend=b),
    "dtype": lambda x, m, b: ppo_policy_loss(x.long(), x, x, m, backend=b),
    "device": lambda x, m, b: ppo_policy_loss(x, x.to("meta"), x, m, backend=b),
    # arguments of a type the op's schema does not take: the Python checks name them
    "estimator not a str": lambda x, m, b: ppo_policy_loss(x, x, x, m, kl_estimator=3, backend=b),
    "clip_eps not a number": lambda x, m, b: ppo_policy_loss(x, x, x, m, clip_eps="wide", backend=b),
}


@pytest.mark.parametrize("case", list(PPO_BAD_CALLS))
def test_ppo_policy_loss_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    x, mask = -torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool)
    expected = _message(lambda: PPO_BAD_CALLS[case](x, mask, "torch"))
    assert _message(lambda: PPO_BAD_CALLS[case](x, mask, "auto")) == expected


def _linear_ppo(case, backend, **change):
    """linear_ppo_policy_loss on a 2 x 3 batch (H=6, V=10) with one argument changed."""
    args = dict(case)
    args.update(change)
    return linear_ppo_policy_loss(
        args.pop("hidden"),
        args.pop("weight"),
        args.pop("labels"),
        args.pop("old"),
        args.pop("adv"),
        args.pop("mask"),
        backend=backend,
        **args,
    )


LINEAR_PPO_BAD_CALLS = {
    "clip_eps": dict(clip_eps=1.0),
    "dual_clip": dict(dual_clip=0.5),
    "estimator": dict(kl_estimator="k4"),
    "loss_agg": dict(loss_agg="sum"),
    "entropy_coef": dict(entropy_coef=float("inf")),
    "hidden size": lambda c: dict(weight=c["weight"][:, :-1]),
    "labels shape": lambda c: dict(labels=c["labels"][:1]),
    "bias shape": lambda c: dict(bias=c["bias"][:-1]),
    "old_logprobs dtype": lambda c: dict(old=c["old"].long()),
    "advantages shape": lambda c: dict(adv=c["adv"][:, :2]),
    "ref_logprobs shape": lambda c: dict(ref_logprobs=c["adv"].T),
    "seq-mean of 1-D": lambda c: dict(
        hidden=c["hidden"][0],
        labels=c["labels"][0],
        old=c["old"][0],
        adv=c["adv"][0],
        mask=c["mask"][0],
        loss_agg="seq-mean-token-mean",
    ),
    "mask shape": lambda c: dict(mask=c["mask"][:1]),
    "mask values": dict(mask=torch.full((2, 3), 2)),
    "temperature": dict(temperature=0.0),
    "chunk_size": dict(chunk_size=0),
    "bool chunk_size": dict(chunk_size=True),
    "label range": lambda c: dict(labels=c["labels"].clone().fill_(10)),
    "label range in a later chunk": dict(labels=torch.tensor([[1, 2, 3], [4, 5, -3]]), chunk_size=2),
    "device": lambda c: dict(old=c["old"].to("meta")),
    # arguments of a type the op's schema does not take: the Python checks name them
    "estimator not a str": dict(kl_estimator=3),
    "temperature not a number": dict(temperature="hot"),
}


@pytest.mark.parametrize("case", list(LINEAR_PPO_BAD_CALLS))
def test_linear_ppo_policy_loss_errors_read_the_same_on_the_cpp_and_torch_paths(case):
    base = dict(
        hidden=torch.randn(2, 3, 6),
        weight=torch.randn(10, 6),
        labels=torch.randint(0, 10, (2, 3)),
        old=-torch.rand(2, 3),
        adv=torch.randn(2, 3),
        mask=torch.ones(2, 3, dtype=torch.bool),
        bias=torch.randn(10),
    )
    change = LINEAR_PPO_BAD_CALLS[case]
    change = change(base) if callable(change) else change
    expected = _message(lambda: _linear_ppo(base, "torch", **change))
    assert _message(lambda: _linear_ppo(base, "auto", **change)) == expected


def test_ppo_policy_loss_does_not_depend_on_the_thread_count():
    n_rows, length = 9, 5000  # token-mean: three segments; seq-mean: nine rows
    old = -torch.rand(n_rows, length) * 3
    new = (old + torch.randn(n_rows, length) * 0.3).requires_grad_(True)
    adv, mask = torch.randn(n_rows, length), torch.rand(n_rows, length) < 0.8
    threads = torch.get_num_threads()
    try:
        for agg in ("token-mean", "seq-mean-token-mean"):
            runs = []
            for count in (1, 2):
                torch.set_num_threads(count)
                new.grad = None
                out = ppo_policy_loss(new, old, adv, mask, kl_coef=0.0, loss_agg=agg)
                out.loss.backward()
                runs.append((out.loss, out.clip_fraction, out.approx_kl, new.grad.clone()))
            for got, want in zip(*runs, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def _kl_reference(logp, ref, mask, estimator, reduction):
    a = logp.detach().double().requires_grad_(True)
    b = ref.detach().double().requires_grad_(True)
    kl = reference.kl_penalty(a, b, mask, estimator, None)
    w = torch.ones_like(kl) if mask is None else mask.double()
    if reduction == "seq-mean":
        kl = (kl * w).sum(-1) / w.sum(-1).clamp_min(1)
    elif reduction == "token-mean":
        kl = (kl * w).sum() / w.sum().clamp_min(1)
    return kl, a, b


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
@pytest.mark.parametrize("reduction", ["none", "seq-mean", "token-mean"])
@pytest.mark.parametrize("loss_of", ["sum", "mean", "weighted"])
@pytest.mark.parametrize("ref_requires_grad", [True, False])
def test_kl_gradient_shapes_against_float64(backend, device, reduction, loss_of, ref_requires_grad):
    """Autograd hands the backward an expanded scalar (sum, mean), a dense tensor (weighted) or a scalar
    (token-mean); each takes its own path in the kernel, and the ref gradient is skipped when not needed."""
    shape = (5, 1037)
    logp, ref = -torch.rand(shape) * 6, -torch.rand(shape) * 6
    mask = torch.rand(shape) > 0.25
    mask[3] = False  # an empty row: mean 0, gradient 0
    weights = torch.randn(shape[: {"none": 2, "seq-mean": 1, "token-mean": 0}[reduction]])
    losses = {
        "sum": lambda t, w: t.sum(),
        "mean": lambda t, w: t.mean(),
        "weighted": lambda t, w: (t * w).sum(),
    }
    a = logp.to(device).clone().requires_grad_(True)
    b = ref.to(device).clone().requires_grad_(ref_requires_grad)
    kl = kl_penalty(a, b, mask.to(device), "k3", reduction=reduction, backend=backend)
    losses[loss_of](kl, weights.to(device)).backward()
    want, wa, wb = _kl_reference(logp, ref, mask, "k3", reduction)
    losses[loss_of](want, weights.double()).backward()
    assert kl.grad_fn is not None
    assert_close_fp32("kl", kl, want)
    assert_close_fp32("d logprobs", a.grad, wa.grad)
    if ref_requires_grad:
        assert_close_fp32("d ref_logprobs", b.grad, wb.grad)
    else:
        assert b.grad is None


@pytest.mark.parametrize("reduction", ["seq-mean", "token-mean"])
def test_kl_reductions_do_not_depend_on_the_thread_count(reduction):
    logp, ref = -torch.rand(3, 70001) * 5, -torch.rand(3, 70001) * 5
    mask = torch.rand(3, 70001) > 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kl_penalty(logp, ref, mask, "k3", reduction=reduction)
        torch.set_num_threads(max(2, threads))
        many = kl_penalty(logp, ref, mask, "k3", reduction=reduction)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    want, _, _ = _kl_reference(logp, ref, mask, "k3", reduction)
    assert_close_fp32("kl", one, want, rtol=1e-6, atol=1e-7)


def test_calls_without_a_gradient_build_no_graph():
    logp, ref = -torch.rand(4, 9), -torch.rand(4, 9)
    assert kl_penalty(logp, ref, estimator="k3").grad_fn is None
    rewards, ranks = torch.randn(4, 3, requires_grad=True), torch.tensor([[1, 2, 3]] * 4)
    with torch.no_grad():
        assert ranking_loss(rewards, ranks).loss.grad_fn is None
    assert ranking_loss(rewards, ranks).loss.grad_fn is not None


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
@pytest.mark.parametrize("n,k", [(3, 70), (3001, 9), (700, 2)])
def test_ranking_tables_that_span_many_batches_and_tasks(backend, device, n, k):
    """K=70 has more pairs per prompt than the CPU kernel's pair table holds at once; 3001 prompts of
    K=9 fill it many times over and split across threads."""
    rewards = torch.randn(n, k) * 3
    ranks = torch.randint(1, k + 1, (n, k))  # drawn with replacement: ties drop pairs
    mask = torch.rand(n, k) > 0.2
    r = rewards.to(device).clone().requires_grad_(True)
    out = ranking_loss(r, ranks.to(device), mask.to(device), 0.3, backend=backend)
    out.loss.backward()
    r64 = rewards.double().requires_grad_(True)
    want = reference.ranking_loss(r64, ranks, mask, 0.3)
    want.loss.backward()
    assert_close_fp32("loss", out.loss, want.loss)
    assert_close_fp32("accuracy", out.accuracy, want.accuracy)
    assert out.num_prompts_without_pairs.item() == want.num_prompts_without_pairs.item()
    assert_close_fp32("d rewards", r.grad, r64.grad)


OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_kl_penalty(backend, device):
    logp = -torch.rand(4, 13, device=device, requires_grad=True)
    ref = -torch.rand(4, 13, device=device, requires_grad=True)
    mask = torch.rand(4, 13, device=device) > 0.3
    for reduction in ("none", "seq-mean", "token-mean"):
        for m, clamp in ((mask, None), (None, 2.0)):
            args = (logp, ref, m, "k3", clamp, reduction)
            torch.library.opcheck(torch.ops.fastrlhf.kl_penalty.default, args, test_utils=OPCHECK_UTILS)
            kl, normalizer = torch.ops.fastrlhf.kl_penalty(*args)
            grad = torch.randn_like(kl)
            torch.library.opcheck(
                torch.ops.fastrlhf.kl_penalty_backward.default,
                (grad, logp.detach(), ref.detach(), m, normalizer, "k3", clamp, reduction, True),
                test_utils=("test_schema", "test_faketensor"),
            )


def test_kl_backward_from_saved_derivative_matches_recomputing():
    """On the CPU the autograd node's forward also writes d kl / d logprobs, and the backward scales it
    instead of recomputing it from both inputs: the same values as the recomputing backward, to an ulp
    (scalar tails may round apart where the compiler contracted a product into an FMA differently), for
    every estimator, clamp, reduction and upstream gradient, with 0 where masked even under a NaN
    upstream gradient there."""
    torch.manual_seed(3)
    shape = (5, 203)  # rows longer than a SIMD step, with tails
    logp = -torch.rand(shape) * 4
    ref = logp + torch.randn(shape) * 1.5
    logp[0, :7] = -float("inf")  # a gap past any clamp
    mask = torch.rand(shape) > 0.25
    for estimator in ("k1", "k2", "k3", "abs"):
        for clamp in (None, 0.5):
            for reduction in ("none", "seq-mean", "token-mean"):
                for m in (mask, None):
                    args = (logp, ref, m, estimator, clamp, reduction)
                    kl, normalizer, derivative = torch.ops.fastrlhf.kl_penalty_with_derivative(*args)
                    plain_kl, plain_normalizer = torch.ops.fastrlhf.kl_penalty(*args)
                    # (k3 of an unmasked, unclamped -inf log-prob is NaN, as torch's is: NaN equals NaN here.)
                    torch.testing.assert_close(kl, plain_kl, rtol=0, atol=0, equal_nan=True)
                    torch.testing.assert_close(normalizer, plain_normalizer, rtol=0, atol=0)
                    assert derivative.shape == shape and derivative.dtype == torch.float32
                    if m is not None:
                        assert (derivative[~m] == 0).all()
                    grads = [torch.randn_like(kl)]
                    if reduction == "none":
                        grads.append(torch.tensor(0.7).expand_as(kl))  # a sum's uniform gradient
                        if m is not None:
                            grads.append(torch.randn_like(kl).masked_fill(~m, float("nan")))
                    for grad in grads:
                        rest = (logp, ref, m, normalizer, estimator, clamp, reduction, True)
                        want = torch.ops.fastrlhf.kl_penalty_backward(grad, *rest)
                        got = torch.ops.fastrlhf.kl_penalty_backward(grad, *rest, derivative)
                        case = (estimator, clamp, reduction, m is not None)
                        for g, w in zip(got, want, strict=True):
                            msg = str(case)
                            torch.testing.assert_close(g, w, rtol=2.4e-7, atol=0, equal_nan=True, msg=msg)
                            if m is not None:
                                assert (g[~m] == 0).all(), case
    # Through autograd, against the float64 reference.
    x = logp.clone().requires_grad_(True)
    r = ref.clone().requires_grad_(True)
    kl_penalty(x, r, mask, "k3", clamp=10.0, reduction="token-mean", backend="cpp").backward()
    x64 = logp.double().requires_grad_(True)
    r64 = ref.double().requires_grad_(True)
    kl64 = reference.kl_penalty(x64, r64, mask, "k3", 10.0)
    (kl64.sum() / mask.sum()).backward()
    assert_close_fp32("d logp", x.grad, x64.grad)
    assert_close_fp32("d ref", r.grad, r64.grad)


def test_opcheck_kl_penalty_with_derivative():
    logp = -torch.rand(4, 13, requires_grad=True)
    ref = -torch.rand(4, 13, requires_grad=True)
    mask = torch.rand(4, 13) > 0.3
    for reduction in ("none", "seq-mean", "token-mean"):
        args = (logp.detach(), ref.detach(), mask, "k3", 2.0, reduction)
        torch.library.opcheck(
            torch.ops.fastrlhf.kl_penalty_with_derivative.default,
            args,
            test_utils=("test_schema", "test_faketensor"),
        )
        kl, normalizer, derivative = torch.ops.fastrlhf.kl_penalty_with_derivative(*args)
        torch.library.opcheck(
            torch.ops.fastrlhf.kl_penalty_backward.default,
            (torch.randn_like(kl), *args[:3], normalizer, "k3", 2.0, reduction, True, derivative),
            test_utils=("test_schema", "test_faketensor"),
        )
    with pytest.raises(ValueError, match="derivative must be a contiguous float32 tensor"):
        torch.ops.fastrlhf.kl_penalty_backward(
            torch.ones(4, 13),
            logp.detach(),
            ref.detach(),
            mask,
            torch.empty(0),
            "k3",
            None,
            "none",
            True,
            torch.zeros(4, 12),
        )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_ppo_policy_loss(backend, device):
    logp = -torch.rand(4, 13, device=device, requires_grad=True)
    old, ref = -torch.rand(4, 13, device=device), -torch.rand(4, 13, device=device)
    adv, mask = torch.randn(4, 13, device=device), torch.rand(4, 13, device=device) > 0.3
    entropy = torch.rand(4, 13, device=device, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        for r, e, dual in ((ref, entropy, 3.0), (None, None, None)):
            args = (logp, old, adv, mask, r, e, 0.2, 0.28, dual, 0.05, "k3", 0.01, agg)
            torch.library.opcheck(torch.ops.fastrlhf.ppo_policy_loss.default, args, test_utils=OPCHECK_UTILS)
            row_weight = torch.ops.fastrlhf.ppo_policy_loss(*args)[5]
            torch.library.opcheck(
                torch.ops.fastrlhf.ppo_policy_loss_backward.default,
                (
                    torch.tensor(1.5, device=device),
                    logp.detach(),
                    old,
                    adv,
                    mask,
                    r,
                    e,
                    row_weight,
                    *args[6:],
                ),
                test_utils=("test_schema", "test_faketensor"),
            )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_linear_ppo_policy_loss(backend, device):
    hidden = torch.randn(3, 5, 6, device=device, requires_grad=True)
    weight = torch.randn(11, 6, device=device, requires_grad=True)
    bias = torch.randn(11, device=device, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5), device=device)
    labels[0, -1] = -100
    old, ref = -torch.rand(3, 5, device=device) * 3, -torch.rand(3, 5, device=device) * 3
    adv, mask = torch.randn(3, 5, device=device), torch.rand(3, 5, device=device) > 0.2
    for agg in ("token-mean", "seq-mean-token-mean"):
        variants = ((bias, old, ref, 3.0, 0.01, True), (None, None, None, None, 0.0, False))
        for b, o, r, dual, entropy_coef, compute in variants:
            args = (hidden, weight, labels, b, o, adv, mask, r, 0.9, -100, 0.2, 0.28, dual, 0.05, "k3")
            args += (entropy_coef, compute, agg, 4)
            torch.library.opcheck(
                torch.ops.fastrlhf.linear_ppo_policy_loss.default, args, test_utils=OPCHECK_UTILS
            )
            torch.library.opcheck(
                torch.ops.fastrlhf.linear_ppo_policy_loss_with_grads.default,
                (*args, [True, False, b is not None]),
                test_utils=("test_schema", "test_faketensor"),
            )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_ranking_loss(backend, device):
    rewards = torch.randn(6, 5, device=device, requires_grad=True)
    ranks = torch.randint(1, 6, (6, 5), device=device)
    mask = torch.rand(6, 5, device=device) > 0.2
    for m in (mask, None):
        args = (rewards, ranks, m, 0.25)
        torch.library.opcheck(torch.ops.fastrlhf.ranking_loss.default, args, test_utils=OPCHECK_UTILS)
        torch.library.opcheck(
            torch.ops.fastrlhf.ranking_loss_with_grad.default,
            (rewards.detach(), ranks, m, 0.25),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_inplace_backward_on_logits_that_cannot_be_viewed_flat(backend, device):
    """[T, B, V] logits transposed from [B, T, V] flatten to [N, V] only by a copy: the in-place backward
    writes the gradient into that copy, then back into the logits buffer."""
    hidden = torch.randn(3, 5, 8, device=device)
    weight = torch.randn(37, 8, device=device, requires_grad=True)
    labels = torch.randint(0, 37, (5, 3), device=device)
    grads = []
    for inplace in (False, True):
        weight.grad = None
        logits = (hidden @ weight.T).transpose(0, 1)  # [T, B, V], not viewable as [N, V]
        lp, ent = gather_logprobs(
            logits, labels, 0.7, return_entropy=True, inplace_backward=inplace, backend=backend
        )
        (lp.sum() + 0.1 * ent.sum()).backward()
        grads.append(weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_gather_logprobs(backend, device):
    logits = torch.randn(2, 3, 41, device=device, requires_grad=True)
    labels = torch.randint(0, 41, (2, 3), device=device)
    labels[0, 1] = -100
    for return_entropy in (True, False):
        args = (logits, labels, 0.8, -100, return_entropy, False)
        torch.library.opcheck(torch.ops.fastrlhf.gather_logprobs.default, args, test_utils=OPCHECK_UTILS)
        _lp, entropy, stats = torch.ops.fastrlhf.gather_logprobs(*args)
        grad_entropy = torch.randn(2, 3, device=device) if return_entropy else None
        grad_logprobs = torch.randn(2, 3, device=device)
        backward_args = (grad_logprobs, grad_entropy, logits.detach(), labels, stats, entropy)
        torch.library.opcheck(
            torch.ops.fastrlhf.gather_logprobs_backward.default,
            (*backward_args, 0.8, -100),
            test_utils=("test_schema", "test_faketensor"),
        )
        inplace_args = list(backward_args)
        inplace_args[2] = logits.detach().clone()
        torch.library.opcheck(
            torch.ops.fastrlhf.gather_logprobs_backward_.default,
            (*inplace_args, 0.8, -100),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_opcheck_linear_logprobs(backend, device):
    hidden = torch.randn(2, 5, 16, device=device, requires_grad=True)
    weight = torch.randn(45, 16, device=device, requires_grad=True)
    bias = torch.randn(45, device=device, requires_grad=True)
    labels = torch.randint(0, 45, (2, 5), device=device)
    labels[1, 2] = -100
    for b in (bias, None):
        for return_entropy in (True, False):
            # chunk_rows 3: several blocks of logits each way; the forward by columns with a bias (on CPU),
            # by rows without
            args = (hidden, weight, labels, b, 1.1, -100, return_entropy, 3, b is not None)
            torch.library.opcheck(torch.ops.fastrlhf.linear_logprobs.default, args, test_utils=OPCHECK_UTILS)
            _lp, entropy, stats = torch.ops.fastrlhf.linear_logprobs(*args)
            grad_entropy = torch.randn(2, 5, device=device) if return_entropy else None
            for output_mask in ([True, True, True], [False, True, False], [True, False, True]):
                torch.library.opcheck(
                    torch.ops.fastrlhf.linear_logprobs_backward.default,
                    (
                        torch.randn(2, 5, device=device),
                        grad_entropy,
                        hidden.detach(),
                        weight.detach(),
                        labels,
                        None if b is None else b.detach(),
                        stats,
                        entropy,
                        1.1,
                        -100,
                        3,
                        output_mask,
                    ),
                    test_utils=("test_schema", "test_faketensor"),
                )


MASK_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
]


@pytest.mark.parametrize("dtype", MASK_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (64, 4111)])  # one block of the C++ check, and 65 of them
def test_a_0_1_mask_of_any_dtype_gives_what_its_bool_mask_gives(dtype, shape):
    logprobs, ref = -torch.rand(shape) * 3, -torch.rand(shape) * 3
    keep = torch.rand(shape) > 0.3
    expected = kl_penalty(logprobs, ref, keep, "k3", reduction="seq-mean")
    as_dtype = kl_penalty(logprobs, ref, keep.to(dtype), "k3", reduction="seq-mean")
    assert torch.equal(as_dtype, expected)
    strided = keep.to(dtype).T.contiguous().T  # same values, column-major
    assert not strided.is_contiguous()
    assert torch.equal(kl_penalty(logprobs, ref, strided, "k3", reduction="seq-mean"), expected)


@pytest.mark.parametrize("dtype", MASK_DTYPES)
@pytest.mark.parametrize("bad_value", [2, -1, 0.5, float("nan")])
def test_the_first_bad_mask_value_is_named_wherever_it_lies(dtype, bad_value):
    is_fraction = bad_value != bad_value or bad_value != int(bad_value)
    if is_fraction and not dtype.is_floating_point:
        pytest.skip("an integer mask cannot hold a fraction or NaN")
    shape = (64, 4111)
    x = torch.randn(shape)
    mask = (torch.rand(shape) > 0.3).to(dtype)
    flat = mask.view(-1)
    flat[200_000] = bad_value  # in a later block and a later thread's chunk
    flat[150_001] = bad_value * 3  # the first bad one
    expected = _message(lambda: kl_penalty(x, x, mask, backend="torch"))
    assert _message(lambda: kl_penalty(x, x, mask, backend="auto")) == expected
    assert _message(lambda: gae(x, x, mask, 1.0, 0.9, backend="auto")) == expected


@pytest.mark.parametrize("bad_value", [2**32, 2**32 + 1, 2**62, -(2**63)])
def test_an_int64_mask_value_with_0_or_1_in_its_low_bits_is_refused(bad_value):
    """The C++ check reads an integer as unsigned and tests the bits above the lowest: these values
    have a 0 or 1 in their low 32 bits (or only the sign bit set), so a check of the low word would
    pass them."""
    shape = (5, 9000)
    x = torch.randn(shape)
    mask = (torch.rand(shape) > 0.3).long()
    mask.view(-1)[40_000] = bad_value
    expected = f"mask must hold only 0 and 1 (it is a mask), found {bad_value}"
    assert expected in _message(lambda: kl_penalty(x, x, mask, backend="auto"))
    assert expected in _message(lambda: gae(x, x, mask, 1.0, 0.9, backend="auto"))


def test_a_uint8_mask_is_read_in_place_and_left_as_it_was():
    shape = (7, 5000)
    x, ref = -torch.rand(shape), -torch.rand(shape)
    keep = torch.rand(shape) > 0.4
    mask = keep.to(torch.uint8)
    before = mask.clone()
    assert torch.equal(kl_penalty(x, ref, mask, "k3"), kl_penalty(x, ref, keep, "k3"))
    assert torch.equal(mask, before)


def _direct_call_args():
    """One valid argument list per TORCH_LIBRARY op with a typed extension entry (csrc/direct_calls.cpp)."""
    logp, ref = -torch.rand(3, 5, requires_grad=True) * 2, -torch.rand(3, 5) * 2
    mask = torch.rand(3, 5) > 0.3
    return {
        "gae": (torch.randn(3, 5), torch.randn(3, 5), mask, 0.99, 0.95),
        "compute_advantages": (
            torch.randn(3),
            logp,
            ref,
            torch.randn(3, 5),
            mask,
            0.1,
            "k3",
            1.0,
            0.9,
            2.0,
            True,
            None,
        ),
        "group_advantages": (torch.randn(2, 3), torch.rand(2, 3, 4) > 0.2, "rloo", 1.0, 1e-6, True),
        "kl_penalty": (logp, ref, mask, "k3", 5.0, "seq-mean"),
        "ranking_loss": (torch.randn(3, 4, requires_grad=True), torch.randint(1, 4, (3, 4)), None, 0.5),
        "ppo_policy_loss": (
            logp,
            ref,
            torch.randn(3, 5),
            mask,
            ref + 0.1,
            torch.rand(3, 5, requires_grad=True),
            0.2,
            None,
            3.0,
            0.1,
            "k2",
            0.01,
            "seq-mean-token-mean",
        ),
        "linear_logprobs": (
            torch.randn(5, 6, requires_grad=True),
            torch.randn(9, 6, requires_grad=True),
            torch.tensor([0, 8, -100, 3, 4]),
            torch.randn(9, requires_grad=True),
            0.9,
            -100,
            True,
            2,
            True,
        ),
        "linear_ppo_policy_loss": (
            torch.randn(2, 5, 6, requires_grad=True),
            torch.randn(9, 6, requires_grad=True),
            torch.tensor([[0, 8, -100, 3, 4], [1, 1, 2, 7, 5]]),
            torch.randn(9, requires_grad=True),
            -torch.rand(2, 5) * 3,
            torch.randn(2, 5),
            mask.new_ones(2, 5),
            -torch.rand(2, 5) * 3,
            0.9,
            -100,
            0.2,
            0.28,
            3.0,
            0.05,
            "k3",
            0.01,
            True,
            "seq-mean-token-mean",
            3,
        ),
        "gather_logprobs": (
            torch.randn(4, 7, requires_grad=True),
            torch.randint(0, 7, (4,)),
            0.7,
            -100,
            True,
            False,
        ),
    }


@pytest.mark.parametrize("name", list(_direct_call_args()))
def test_the_extension_entry_of_an_op_is_the_dispatcher_op_itself(name):
    """``fastrlhf._C.<op>`` (the wrappers' eager route) gives torch.ops' outputs bit for bit, with the same
    autograd graph, and enters the dispatcher at the top: a dispatch mode (below autograd) sees the same ops
    either way."""
    from fastrlhf import _C

    args = _direct_call_args()[name]
    direct, via_torch_ops = getattr(_C, name)(*args), getattr(torch.ops.fastrlhf, name)(*args)
    for got, want in zip(direct, via_torch_ops, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=False)
        assert (got.grad_fn is None) == (want.grad_fn is None)
        assert type(got.grad_fn) is type(want.grad_fn)
    with DispatchedOps() as seen_direct:
        getattr(_C, name)(*args)
    with DispatchedOps() as seen_torch_ops:
        getattr(torch.ops.fastrlhf, name)(*args)
    assert seen_direct.ops == seen_torch_ops.ops
    assert seen_direct.ops[0].name().startswith(f"fastrlhf::{name}")


def test_a_number_given_as_a_str_is_read_as_that_number_on_every_path():
    """The Python checks read numbers with float(); the compiled op then gets the float, not the str."""
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    want = kl_penalty(x, y, estimator="k3", clamp=0.5, backend="torch")
    for backend in ("torch", "auto", "cpp"):
        assert_close_fp32(backend, kl_penalty(x, y, estimator="k3", clamp="0.5", backend=backend), want)
    scores, values, mask = torch.randn(2), torch.randn(2, 3), torch.ones(2, 3)
    want = compute_advantages(scores, x, y, values, mask, 0.1, "k3", kl_clamp=0.5, backend="torch")
    for backend in ("torch", "auto", "cpp"):
        got = compute_advantages(scores, x, y, values, mask, "0.1", "k3", kl_clamp="0.5", backend=backend)
        assert_close_fp32(backend, got.advantages, want.advantages)
