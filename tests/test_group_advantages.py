"""group_advantages on every backend against plain Python loops (tests/loops.py) and against veRL's four
outcome estimators restated (tests/loops.py, verl_*), plus its edge cases and its errors."""

import math

import numpy as np
import pytest
import torch
from conftest import cpu_backends, gpu_backends
from loops import (
    group_advantages_loop,
    verl_grpo,
    verl_reinforce_pp,
    verl_reinforce_pp_baseline,
    verl_rloo,
)
from numerics import assert_close_fp32, assert_no_nan

from fastrlhf.ops import GroupAdvantages, group_advantages, reference

# (estimator, norm_by_std): every variant the op computes.
VARIANTS = {
    "grpo": ("grpo", True),
    "dr-grpo": ("grpo", False),
    "rloo": ("rloo", True),
    "reinforce++": ("reinforce++", True),
    "reinforce++-baseline": ("reinforce++-baseline", True),
}
GAMMA = 0.97


def outcome_mask(rows, length):
    """Right-padded rows of random length, some rows with holes, and one empty row."""
    lengths = torch.randint(0, length + 1, (rows,))
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if rows:
        holes = torch.rand(rows, length) > 0.3
        pick = torch.rand(rows) < 0.4
        mask[pick] = holes[pick]
        mask[torch.randint(0, rows, ())] = False
    return mask


def outcome_scores(batch, k, dtype=torch.float32):
    """Half the prompts with 0/1 rewards (so all-equal groups occur, as with verifiable rewards), half
    with Gaussian scores."""
    gaussian = torch.randn(batch, k) * 3
    binary = (torch.rand(batch, k) > 0.5).float()
    return torch.where(torch.rand(batch, 1) < 0.5, binary, gaussian).to(dtype)


def run(scores, mask, variant, backend, **kwargs):
    estimator, norm = VARIANTS[variant]
    kwargs.setdefault("gamma", GAMMA)
    return group_advantages(scores, mask, estimator, norm_by_std=norm, backend=backend, **kwargs)


def expected(scores, mask, variant, **kwargs):
    estimator, norm = VARIANTS[variant]
    kwargs.setdefault("gamma", GAMMA)
    return group_advantages_loop(scores, mask, estimator, norm_by_std=norm, **kwargs)


def check(name, out, want, shape, rtol=1e-5, atol=1e-5):
    assert isinstance(out, GroupAdvantages)
    assert out.advantages.shape == shape and out.returns.shape == shape
    assert_close_fp32(f"{name} advantages", out.advantages.reshape(want[0].shape), want[0], rtol, atol)
    assert_close_fp32(f"{name} returns", out.returns.reshape(want[1].shape), want[1], rtol, atol)


# ------------------------------------------------------------------------------ against the Python loops


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "batch,k,length,flat",
    [(0, 3, 7, False), (1, 1, 1, True), (13, 2, 33, True), (3, 5, 7, False), (2, 3, 1, False)],
    ids=str,
)
def test_matches_python_loops(backend, variant, batch, k, length, flat):
    if variant == "rloo" and k == 1:
        pytest.skip("rloo needs k >= 2 (test_validation checks the error)")
    scores = outcome_scores(batch, k)
    mask = outcome_mask(batch * k, length)
    if not flat:
        mask = mask.reshape(batch, k, length)
    out = run(scores, mask, variant, backend)
    assert out.advantages.dtype == torch.float32
    check(variant, out, expected(scores, mask, variant), mask.shape)
    if VARIANTS[variant][0] != "reinforce++":
        assert out.returns is out.advantages  # as veRL: one tensor


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", ["grpo", "rloo", "reinforce++", "reinforce++-baseline"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_score_dtypes(backend, variant, dtype):
    """bf16 / fp16 scores compute in fp32 (their values are exact there); fp64 stays fp64 on auto."""
    scores = outcome_scores(4, 3, dtype)
    mask = outcome_mask(12, 9)
    out = run(scores, mask, variant, backend)
    want = expected(scores, mask, variant)
    if dtype == torch.float64 and backend == "torch":
        assert out.advantages.dtype == torch.float64
        torch.testing.assert_close(out.advantages, want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.returns, want[1], rtol=1e-12, atol=1e-12)
    else:
        check(variant, out, want, mask.shape)


def test_float64_auto_uses_the_reference():
    scores, mask = torch.randn(5, 4, dtype=torch.float64), outcome_mask(20, 11)
    for variant in VARIANTS:
        out = run(scores, mask, variant, "auto")
        assert out.advantages.dtype == torch.float64
        want = expected(scores, mask, variant)
        torch.testing.assert_close(out.advantages, want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends())
def test_mask_dtypes_and_non_contiguous_inputs(backend):
    batch, k, length = 4, 3, 10
    scores = outcome_scores(batch, k)
    mask = outcome_mask(batch * k, length).reshape(batch, k, length)
    for variant in VARIANTS:
        want = run(scores, mask, variant, backend)
        for m in (mask.to(torch.uint8), mask.to(torch.int64), mask.float()):
            got = run(scores, m, variant, backend)
            assert torch.equal(got.advantages, want.advantages), (variant, m.dtype)
        # Scores as a transposed view; the mask as every other time step of a wider one.
        scores_t = scores.t().contiguous().t()
        wide = torch.zeros(batch, k, 2 * length, dtype=torch.bool)
        wide[..., ::2] = mask
        assert not scores_t.is_contiguous() and not wide[..., ::2].is_contiguous()
        got = run(scores_t, wide[..., ::2], variant, backend)
        assert_close_fp32(variant, got.advantages, want.advantages.double(), 1e-6, 1e-6)


@pytest.mark.parametrize("backend", cpu_backends(include_torch=False))
def test_realistic_size(backend):
    """A GRPO batch (32 prompts × 8 responses × 700 tokens on cpp; smaller under the interpreter)."""
    batch, k, length = (32, 8, 700) if backend == "cpp" else (4, 8, 300)
    scores = outcome_scores(batch, k)
    mask = outcome_mask(batch * k, length)
    for variant in VARIANTS:
        out = run(scores, mask, variant, backend)
        estimator, norm = VARIANTS[variant]
        want = reference.group_advantages(scores.double(), mask, estimator, GAMMA, 1e-6, norm)
        check(variant, out, want, mask.shape, rtol=1e-5, atol=2e-5)


def test_triton_block_carry():
    """Small time blocks make the discount carry its count across many blocks."""
    pytest.importorskip("triton")
    from fastrlhf.ops.triton import group_advantages as kernels

    if not any(p.id == "triton" and not p.marks for p in cpu_backends()):
        pytest.skip("triton cannot run on CPU here")
    scores = torch.randn(6) * 2
    mask = outcome_mask(6, 101)
    for mode, estimator in [(kernels.DISCOUNT, "reinforce++"), (kernels.NORMALIZE, "grpo")]:
        got = kernels.group_advantages_forward(scores, mask.to(torch.uint8), 3, mode, 0.9, 1e-6, block_t=16)
        rows = reference.outcome_row_values(scores.view(2, 3), estimator).reshape(-1)
        want = reference.outcome_token_values(rows, mask, estimator, 0.9)
        assert_close_fp32(estimator, got, want, 1e-6, 1e-6)


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_matches_python_loops(backend, variant):
    for batch, k, length in [(0, 4, 5), (7, 1, 1), (5, 3, 1029), (64, 8, 1024)]:
        if variant == "rloo" and k == 1:
            continue
        scores = outcome_scores(batch, k)
        mask = outcome_mask(batch * k, length)
        out = run(scores.cuda(), mask.cuda(), variant, backend)
        check(f"{variant} {batch}x{k}x{length}", out, expected(scores, mask, variant), mask.shape)


# ------------------------------------------------------------------------------ veRL, restated


def verl_inputs(batch, k, length, dtype=torch.float64):
    """Right-padded response masks (at least one token each), the score as the reward of each row's last
    valid token, and veRL's ``index`` (one uid per prompt, rows in prompt order)."""
    lengths = torch.randint(1, length + 1, (batch * k,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(dtype)
    scores = outcome_scores(batch, k, dtype)
    rewards = torch.zeros(batch * k, length, dtype=dtype)
    rewards[torch.arange(batch * k), lengths - 1] = scores.reshape(-1)
    index = np.repeat(np.array([f"uid-{i}" for i in range(batch)], dtype=object), k)
    return scores, mask, rewards, index


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("k", [1, 2, 5])
def test_matches_verl(backend, k):
    scores, mask, rewards, index = verl_inputs(6, k, 17)
    cases = [
        ("grpo", dict(norm_by_std=True), verl_grpo(rewards, mask, index)),
        ("grpo", dict(norm_by_std=False), verl_grpo(rewards, mask, index, norm_adv_by_std_in_grpo=False)),
        ("reinforce++", dict(gamma=GAMMA), verl_reinforce_pp(rewards, mask, GAMMA)),
        ("reinforce++-baseline", {}, verl_reinforce_pp_baseline(rewards, mask, index)),
    ]
    if k > 1:
        cases.append(("rloo", {}, verl_rloo(rewards, mask, index)))
    for estimator, kwargs, (want_adv, want_ret) in cases:
        out = group_advantages(scores.float(), mask, estimator, backend=backend, **kwargs)
        assert_close_fp32(f"{estimator} advantages", out.advantages, want_adv, 2e-5, 2e-5)
        assert_close_fp32(f"{estimator} returns", out.returns, want_ret, 2e-5, 2e-5)


def test_reinforce_pp_skips_holes_where_verl_restarts():
    """The documented difference: a masked token inside a response. veRL restarts its discounted sum
    there (tokens before the hole get no return); group_advantages carries the discount over it."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    out = group_advantages(torch.tensor([[2.0]]), mask, "reinforce++", gamma=0.5)
    assert out.returns.tolist() == [[2 * 0.5**3, 2 * 0.5**2, 0.0, 2 * 0.5, 2.0, 0.0]]
    _, verl_returns = verl_reinforce_pp(rewards, mask, 0.5)
    assert verl_returns[0, :2].tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("backend", cpu_backends())
def test_groups_of_one_follow_verl(backend):
    scores = torch.tensor([[3.0], [-2.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    grpo = group_advantages(scores, mask, "grpo", eps=0.5, backend=backend)
    assert_close_fp32("grpo", grpo.advantages[:, 0], torch.tensor([2.0, -2.0 / 1.5], dtype=torch.float64))
    dr = group_advantages(scores, mask, "grpo", norm_by_std=False, backend=backend)
    assert dr.advantages[:, 0].tolist() == [3.0, -2.0]
    base = group_advantages(scores, mask, "reinforce++-baseline", backend=backend)
    assert_close_fp32("baseline", base.advantages, expected(scores, mask, "reinforce++-baseline")[0])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("value", [0.1, 7.0, -1e30, 3e38])
def test_all_equal_groups_are_exactly_zero(backend, value):
    scores = torch.full((3, 5), value)
    scores[2] = torch.arange(5.0)  # one group with a spread, so whitening has something to scale
    mask = torch.ones(3, 5, 6, dtype=torch.bool)
    for variant in ("grpo", "dr-grpo", "rloo", "reinforce++-baseline"):
        for eps in (1e-6, 0.0):
            out = run(scores, mask, variant, backend, eps=eps)
            assert_no_nan(variant, out.advantages)
            assert torch.all(out.advantages[:2] == 0), (variant, eps)


@pytest.mark.parametrize("backend", cpu_backends())
def test_extreme_scores_do_not_overflow(backend):
    """±1e30 (squares far past fp32's range, and gaps of 30 orders within a group): finite and equal to
    the loops. Scores near fp32's max only for grpo and reinforce++, whose values stay in range (r - mean
    of such a group is past it, a true overflow)."""
    moderate = torch.tensor([[1e30, -1e30, 1.0, 0.0], [1e30, 1e30, 1e30, -1e30], [1e30, 5e29, -2e29, 7e29]])
    huge = torch.cat([moderate, torch.tensor([[3e38, 2e38, -3e38, 1e38]])])
    for variant in VARIANTS:
        scores = (
            huge if VARIANTS[variant][0] in ("grpo", "reinforce++") and variant != "dr-grpo" else moderate
        )
        mask = outcome_mask(scores.numel(), 5)
        mask[:, 0] = True
        out = run(scores, mask, variant, backend)
        adv, ret = expected(scores, mask, variant)
        assert torch.isfinite(out.advantages).all() and torch.isfinite(out.returns).all(), variant
        # The group mean is exact in the loops (math.fsum) and float64 in the kernels: 1 - mean next to
        # ±1e30 is off by up to 1e30 * 2^-53 there, so unscaled values are bounded against the group's
        # scale. grpo divides by the std and the REINFORCE++ variants whiten: their results are scale-free.
        scale = 1.0
        if variant in ("dr-grpo", "rloo"):
            scale = scores.abs().amax(1).repeat_interleave(scores.shape[1])[:, None].double()
        for got, want in [(out.advantages, adv), (out.returns, ret)]:
            assert torch.all((got.double() - want).abs() <= 1e-5 * want.abs() + 1e-6 * scale), variant


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_masks_and_batches_give_zeros(backend):
    scores = torch.randn(3, 4)
    for variant in VARIANTS:
        for valid in (0, 1):  # no valid token in the whole batch, then exactly one
            mask = torch.zeros(3, 4, 6, dtype=torch.bool)
            if valid:
                mask[1, 2, 3] = True
            out = run(scores, mask, variant, backend)
            assert_no_nan(variant, out.advantages)
            assert_no_nan(variant, out.returns)
            if variant.startswith("reinforce++") or not valid:
                assert torch.all(out.advantages == 0), (variant, valid)
        for flat in (True, False):
            empty_mask = torch.zeros((0, 9) if flat else (0, 4, 9))
            out = run(torch.zeros(0, 4), empty_mask, variant, backend)
            assert out.advantages.shape == empty_mask.shape and out.returns.shape == empty_mask.shape


@pytest.mark.parametrize("backend", cpu_backends())
def test_discount_edges(backend):
    """γ = 0 keeps the score on the last valid token only, γ = 1 spreads it unchanged; a long row on
    the C++ kernel."""
    scores = torch.tensor([[2.0, -1.0]])
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
    zero = group_advantages(scores, mask, "reinforce++", gamma=0.0, backend=backend).returns
    assert zero.tolist() == [[0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0]]
    one = group_advantages(scores, mask, "reinforce++", gamma=1.0, backend=backend).returns
    assert one.tolist() == [[2.0, 0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0]]
    if backend == "cpp":
        scores, mask = torch.randn(3, 1), outcome_mask(3, 32771)
        out = group_advantages(scores, mask, "reinforce++", gamma=0.9999, backend=backend)
        want = reference.group_advantages(scores.double(), mask, "reinforce++", 0.9999)
        assert_close_fp32("long returns", out.returns, want[1], 1e-5, 1e-6)
        assert_close_fp32("long advantages", out.advantages, want[0], 1e-4, 1e-5)


def test_masked_whiten_rule_for_fewer_than_two_tokens():
    """reference.masked_whiten, the one home of the rule: 0 (not NaN) values and gradients."""
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    for count in (0, 1):
        mask = torch.zeros(2, 5, dtype=torch.bool)
        mask[1, :count] = True
        out = reference.masked_whiten(x, mask)
        assert torch.all(out == 0)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3] = True
    kept = reference.masked_whiten(x, mask, shift_mean=False)
    assert kept[0, 3] == x[0, 3] and kept.count_nonzero() == 1


# ------------------------------------------------------------------------------ errors


def test_validation():
    scores, mask = torch.randn(2, 3), torch.ones(2, 3, 4)
    cases = [
        (dict(scores=scores[0]), r"scores must be 2-D \[B, k\]"),
        (dict(scores=torch.ones(2, 3, dtype=torch.int64)), "scores has dtype int64"),
        (dict(scores=torch.zeros(2, 0), response_mask=torch.ones(0, 4)), "k .* must be >= 1"),
        (
            dict(response_mask=torch.ones(2, 4, 4)),
            r"response_mask has shape \(2, 4, 4\); expected \(2, 3, T\)",
        ),
        (dict(response_mask=torch.ones(5, 4)), r"response_mask has shape \(5, 4\); expected \(6, T\)"),
        (dict(response_mask=torch.ones(2, 3, 4, 1)), r"response_mask must be \[B, k, T\] or \[B\*k, T\]"),
        (dict(response_mask=mask * 2), "response_mask must hold only 0 and 1"),
        (dict(response_mask=torch.ones(2, 3, 4, dtype=torch.bool, device="meta")), "one device"),
        (dict(estimator="ppo"), "estimator='ppo' is not one of"),
        (dict(scores=torch.randn(2, 1), response_mask=torch.ones(2, 4), estimator="rloo"), "rloo.*k=1"),
        (dict(eps=-1e-3), "eps must be >= 0"),
        (dict(eps=float("nan")), "eps must be finite"),
        (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
        (dict(gamma=float("inf")), "gamma must be finite"),
        (dict(scores=torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])), "scores must be finite"),
        (dict(scores=torch.tensor([[1.0, 0.0, 0.0], [0.0, float("-inf"), 0.0]])), "scores must be finite"),
        (dict(backend="cuda"), "backend='cuda'"),
    ]
    for overrides, message in cases:
        kwargs = dict(scores=scores, response_mask=mask) | overrides
        with pytest.raises(ValueError, match=message):
            group_advantages(**kwargs)


def test_no_gradient_and_opcheck():
    scores = torch.randn(2, 3, requires_grad=True)
    out = group_advantages(scores, torch.ones(6, 4), "grpo")
    assert not out.advantages.requires_grad
    from fastrlhf.ops import available_backends

    if available_backends()["cpp"].available:
        masks = (torch.rand(6, 5) > 0.3, torch.ones(2, 3, 5, dtype=torch.uint8))
        for mask in masks:
            for estimator in reference.OUTCOME_ESTIMATORS:
                torch.library.opcheck(
                    torch.ops.fastrlhf.group_advantages.default,
                    (scores, mask, estimator, 0.9, 1e-6, True),
                    test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
                )


def test_loop_reference_is_independent():
    """The Python loops agree with hand-computed values (so the other tests rest on known numbers)."""
    scores = torch.tensor([[1.0, 2.0, 6.0]])
    mask = torch.ones(3, 1)
    adv, _ = group_advantages_loop(scores, mask, "grpo", eps=0.0)
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert adv[:, 0].tolist() == pytest.approx([-2 / std, -1 / std, 3 / std])
    adv, _ = group_advantages_loop(scores, mask, "rloo")
    assert adv[:, 0].tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5])
