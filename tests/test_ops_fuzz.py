"""Hypothesis drives random shapes, masks, temperatures and value scales (up to 1e4, with -inf logits)
into the ops on every backend, on the CPU and (when one is present) the GPU: the result equals the
float64 reference (no NaN), or the op raises a ValueError that names the bad argument. Examples are
bounded so the file runs in under a minute with the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import on_device, op_targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_close_fp32

from fastrlhf import ops
from fastrlhf.ops import reference

# Per op, backend and dtype; FASTRLHF_FUZZ_EXAMPLES raises it for a longer hunt (Hypothesis draws new
# examples on every run, so the suite searches a little further each time).
EXAMPLES = int(os.environ.get("FASTRLHF_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
SCALES = st.sampled_from([1.0, 30.0, 1e4])


# The loss ops have one implementation (torch ops): they run on each device.
DEVICES = [pytest.param(p.values[1], marks=p.marks, id=p.id) for p in op_targets() if p.values[0] == "torch"]


def _tensor(seed: int, shape, scale: float) -> torch.Tensor:
    """float64 values that fp32 holds exactly: the kernels' fp32 inputs and the float64 reference's are
    the same numbers (at scale 1e4, rounding to fp32 alone moves a gradient by ~3e-5)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).float().double()


@pytest.mark.parametrize("backend,device", op_targets())
def test_gather_logprobs_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        rows=st.integers(1, 5),
        vocab=st.integers(2, 300),
        scale=SCALES,
        temperature=st.sampled_from([0.5, 1.0, 1.7]),
        masked_share=st.floats(0, 1),
        with_neg_inf=st.booleans(),
        seed=st.integers(0, 2**31),
    )
    def check(rows, vocab, scale, temperature, masked_share, with_neg_inf, seed):
        logits64 = _tensor(seed, (rows, vocab), scale)
        labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 1))
        if with_neg_inf:  # a forbidden token per row (never the label)
            banned = (labels + 1) % vocab
            logits64[torch.arange(rows), banned] = float("-inf")
        ignored = torch.rand(rows, generator=torch.Generator().manual_seed(seed + 2)) < masked_share
        labels = torch.where(ignored, torch.full_like(labels, -100), labels)
        want_lp, want_ent = reference.gather_logprobs(logits64, labels, temperature, return_entropy=True)
        logits = logits64.float().to(device).requires_grad_()
        lp, ent = ops.gather_logprobs(
            logits, labels.to(device), temperature, return_entropy=True, backend=backend
        )
        tolerance = 1e-6 * scale / temperature + 5e-5
        assert_close_fp32("logprobs", lp, want_lp, rtol=1e-5, atol=tolerance)
        assert_close_fp32("entropy", ent, want_ent, rtol=1e-5, atol=tolerance)
        lp.sum().backward()
        logits_ref = logits64.clone().requires_grad_()
        reference.gather_logprobs(logits_ref, labels, temperature).sum().backward()
        assert_close_fp32("grad", logits.grad, logits_ref.grad, rtol=1e-4, atol=1e-6)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_kl_penalty_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        shape=st.tuples(st.integers(1, 4), st.integers(1, 70)),
        estimator=st.sampled_from(["k1", "k2", "k3", "abs"]),
        scale=st.sampled_from([0.1, 1.0, 10.0]),
        clamp=st.sampled_from([None, 5.0]),
        seed=st.integers(0, 2**31),
    )
    def check(shape, estimator, scale, clamp, seed):
        a64, b64 = _tensor(seed, shape, scale), _tensor(seed + 1, shape, scale)
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 2)) < 0.7
        want = reference.kl_penalty(a64, b64, mask, estimator=estimator, clamp=clamp)
        got = ops.kl_penalty(
            *on_device(device, a64.float(), b64.float(), mask),
            estimator=estimator,
            clamp=clamp,
            backend=backend,
        )
        # k3 = exp(-d) + d - 1 at |d| up to ~40 is ~1e17: relative error only.
        assert_close_fp32(f"kl {estimator}", got, want, rtol=1e-4, atol=1e-5 * scale)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_gae_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        rows=st.integers(1, 4),
        steps=st.integers(1, 90),
        gamma=st.sampled_from([0.9, 0.99, 1.0]),
        lam=st.sampled_from([0.0, 0.95, 1.0]),
        scale=st.sampled_from([0.01, 1.0, 100.0]),
        seed=st.integers(0, 2**31),
    )
    def check(rows, steps, gamma, lam, scale, seed):
        rewards64, values64 = _tensor(seed, (rows, steps), scale), _tensor(seed + 1, (rows, steps), scale)
        mask = torch.rand(rows, steps, generator=torch.Generator().manual_seed(seed + 2)) < 0.8
        want_adv, want_ret = reference.gae(rewards64, values64, mask, gamma, lam)
        adv, ret = ops.gae(
            *on_device(device, rewards64.float(), values64.float(), mask), gamma, lam, backend=backend
        )
        bound = 1e-5 * scale * steps
        assert_close_fp32("advantages", adv, want_adv, rtol=1e-5, atol=bound)
        assert_close_fp32("returns", ret, want_ret, rtol=1e-5, atol=bound)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_ranking_loss_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        prompts=st.integers(1, 6),
        k=st.integers(2, 9),
        scale=SCALES,
        margin=st.sampled_from([0.0, 0.5]),
        seed=st.integers(0, 2**31),
    )
    def check(prompts, k, scale, margin, seed):
        rewards64 = _tensor(seed, (prompts, k), scale)
        generator = torch.Generator().manual_seed(seed + 1)
        ranks = torch.randint(1, k + 1, (prompts, k), generator=generator)
        mask = torch.rand(prompts, k, generator=generator) < 0.8
        rewards = rewards64.float().to(device).requires_grad_()
        ranks_and_mask = on_device(device, ranks, mask)
        if int(mask.sum(1).max()) < 2:  # no prompt has a pair to rank: refused, naming the mask
            with pytest.raises(ValueError, match="mask"):
                ops.ranking_loss(rewards, *ranks_and_mask, margin=margin, backend=backend)
            return
        want = reference.ranking_loss(rewards64.clone().requires_grad_(), ranks, mask, margin=margin)
        got = ops.ranking_loss(rewards, *ranks_and_mask, margin=margin, backend=backend)
        assert_close_fp32("loss", got.loss, want.loss, rtol=1e-5, atol=1e-5)
        got.loss.backward()
        reference_rewards = rewards64.clone().requires_grad_()
        reference.ranking_loss(reference_rewards, ranks, mask, margin=margin).loss.backward()
        assert_close_fp32("grad", rewards.grad, reference_rewards.grad, rtol=1e-4, atol=1e-6)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_mismatched_shapes_raise_a_value_error_naming_the_argument(backend, device):
    @FUZZ
    @given(rows=st.integers(1, 4), vocab=st.integers(2, 50), extra=st.integers(1, 3))
    def check(rows, vocab, extra):
        logits = torch.randn(rows, vocab, device=device)
        labels = torch.zeros(rows + extra, dtype=torch.long, device=device)
        with pytest.raises(ValueError, match="labels"):
            ops.gather_logprobs(logits, labels, backend=backend)
        with pytest.raises(ValueError, match="ref_logprobs|mask"):
            ops.kl_penalty(logits, torch.randn(rows, vocab + extra, device=device), backend=backend)
        with pytest.raises(ValueError, match="values|mask"):
            ops.gae(
                logits,
                torch.randn(rows, vocab + extra, device=device),
                torch.ones(rows, vocab, device=device),
                1.0,
                0.95,
                backend=backend,
            )

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_linear_logprobs_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        rows=st.integers(1, 9),
        hidden_size=st.integers(1, 40),
        vocab=st.integers(2, 200),
        with_bias=st.booleans(),
        temperature=st.sampled_from([0.7, 1.0, 1.3]),
        scale=st.sampled_from([0.1, 1.0, 10.0]),
        seed=st.integers(0, 2**31),
    )
    def check(rows, hidden_size, vocab, with_bias, temperature, scale, seed):
        hidden64 = _tensor(seed, (rows, hidden_size), scale)
        weight64 = _tensor(seed + 1, (vocab, hidden_size), 1.0 / hidden_size**0.5)
        bias64 = _tensor(seed + 2, (vocab,), 1.0) if with_bias else None
        labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 3))
        labels[0] = -100  # one ignored row at least
        want_lp, want_ent = reference.linear_logprobs(
            hidden64, weight64, labels, bias64, temperature, return_entropy=True
        )
        hidden = hidden64.float().to(device).requires_grad_()
        weight = weight64.float().to(device).requires_grad_()
        bias = bias64.float().to(device) if with_bias else None
        lp, ent = ops.linear_logprobs(
            hidden, weight, labels.to(device), bias, temperature, return_entropy=True, backend=backend
        )
        tolerance = 2e-5 * (1 + scale) / temperature
        assert_close_fp32("logprobs", lp, want_lp, rtol=1e-5, atol=tolerance)
        assert_close_fp32("entropy", ent, want_ent, rtol=1e-5, atol=tolerance)
        lp.sum().backward()
        hidden_ref, weight_ref = hidden64.clone().requires_grad_(), weight64.clone().requires_grad_()
        reference.linear_logprobs(hidden_ref, weight_ref, labels, bias64, temperature).sum().backward()
        assert_close_fp32("d hidden", hidden.grad, hidden_ref.grad, rtol=1e-4, atol=tolerance)
        assert_close_fp32("d weight", weight.grad, weight_ref.grad, rtol=1e-4, atol=tolerance)

    check()


def _policy_inputs(seed: int, shape, scale: float):
    logprobs = -_tensor(seed, shape, 1.0).abs() - 0.01
    old = logprobs + _tensor(seed + 1, shape, scale)  # the ratio spans clipped and unclipped tokens
    advantages = _tensor(seed + 2, shape, 1.0)
    ref = logprobs + _tensor(seed + 3, shape, scale)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 4)) < 0.75
    return logprobs, old, advantages, ref, mask


@pytest.mark.parametrize("backend,device", op_targets())
def test_linear_ppo_policy_loss_matches_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        rows=st.integers(1, 9),
        hidden_size=st.integers(1, 24),
        vocab=st.integers(2, 120),
        clip_eps=st.sampled_from([0.1, 0.2]),
        kl_coef=st.sampled_from([0.0, 0.05]),
        kl_estimator=st.sampled_from(["k1", "k2", "k3"]),
        entropy_coef=st.sampled_from([0.0, 0.01]),
        seed=st.integers(0, 2**31),
    )
    def check(rows, hidden_size, vocab, clip_eps, kl_coef, kl_estimator, entropy_coef, seed):
        hidden64 = _tensor(seed, (rows, hidden_size), 1.0)
        weight64 = _tensor(seed + 1, (vocab, hidden_size), 1.0 / hidden_size**0.5)
        labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 2))
        _, old, advantages, ref, mask = _policy_inputs(seed + 3, (rows,), 0.3)
        options = dict(
            clip_eps=clip_eps,
            kl_coef=kl_coef,
            kl_estimator=kl_estimator,
            entropy_coef=entropy_coef,
            ref_logprobs=ref if kl_coef else None,
            compute_entropy=True,
        )
        hidden_ref, weight_ref = hidden64.clone().requires_grad_(), weight64.clone().requires_grad_()
        want = reference.linear_ppo_policy_loss(
            hidden_ref, weight_ref, labels, old, advantages, mask, **options
        )
        hidden = hidden64.float().to(device).requires_grad_()
        weight = weight64.float().to(device).requires_grad_()
        options["ref_logprobs"] = ref.float().to(device) if kl_coef else None
        got = ops.linear_ppo_policy_loss(
            hidden,
            weight,
            *on_device(device, labels, old.float(), advantages.float(), mask),
            backend=backend,
            **options,
        )
        assert_close_fp32("loss", got.loss, want.loss, rtol=1e-4, atol=1e-5)
        want.loss.backward()
        got.loss.backward()
        assert_close_fp32("d hidden", hidden.grad, hidden_ref.grad, rtol=1e-4, atol=1e-5)
        assert_close_fp32("d weight", weight.grad, weight_ref.grad, rtol=1e-4, atol=1e-5)

    check()


@pytest.mark.parametrize("device", DEVICES)
def test_policy_and_value_losses_match_float64_on_fuzzed_inputs(device):
    @FUZZ
    @given(
        shape=st.tuples(st.integers(1, 5), st.integers(1, 40)),
        scale=st.sampled_from([0.01, 0.3, 3.0]),
        clip=st.sampled_from([None, 0.2]),
        loss_agg=st.sampled_from(["token-mean", "seq-mean-token-mean"]),
        seed=st.integers(0, 2**31),
    )
    def check(shape, scale, clip, loss_agg, seed):
        logprobs64, old, advantages, ref, mask = _policy_inputs(seed, shape, scale)
        options = dict(clip_eps=0.2, ref_logprobs=ref, kl_coef=0.05, loss_agg=loss_agg)
        want = reference.ppo_policy_loss(
            logprobs64.clone().requires_grad_(), old, advantages, mask, **options
        )
        logprobs = logprobs64.float().to(device).requires_grad_()
        options["ref_logprobs"] = ref.float().to(device)
        got = ops.ppo_policy_loss(
            logprobs, *on_device(device, old.float(), advantages.float(), mask), **options
        )
        assert_close_fp32("policy loss", got.loss, want.loss, rtol=1e-4, atol=1e-6)
        assert_close_fp32("clip fraction", got.clip_fraction, want.clip_fraction, rtol=0, atol=1e-6)

        values64, old_values, returns = (_tensor(seed + i, shape, scale * 10) for i in (10, 11, 12))
        want_v = reference.value_loss(values64, old_values, returns, mask, clip=clip, loss_agg=loss_agg)
        got_v = ops.value_loss(
            *on_device(device, values64.float(), old_values.float(), returns.float(), mask),
            clip=clip,
            loss_agg=loss_agg,
        )
        assert_close_fp32("value loss", got_v.loss, want_v.loss, rtol=1e-4, atol=1e-6)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
def test_group_advantages_match_float64_on_fuzzed_inputs(backend, device):
    @FUZZ
    @given(
        prompts=st.integers(1, 5),
        k=st.integers(1, 8),
        steps=st.integers(1, 30),
        estimator=st.sampled_from(["grpo", "rloo", "reinforce++", "reinforce++-baseline"]),
        norm_by_std=st.booleans(),
        scale=SCALES,
        seed=st.integers(0, 2**31),
    )
    def check(prompts, k, steps, estimator, norm_by_std, scale, seed):
        if estimator == "rloo" and k < 2:
            k = 2  # leave-one-out needs another response
        scores64 = _tensor(seed, (prompts, k), scale)
        mask = torch.rand(prompts * k, steps, generator=torch.Generator().manual_seed(seed + 1)) < 0.8
        want_adv, want_ret = reference.group_advantages(scores64, mask, estimator, norm_by_std=norm_by_std)
        got = ops.group_advantages(
            *on_device(device, scores64.float(), mask), estimator, norm_by_std=norm_by_std, backend=backend
        )
        tolerance = 1e-5 * (1 + (scale if not norm_by_std or estimator != "grpo" else 1.0)) * steps
        assert_close_fp32("advantages", got.advantages, want_adv, rtol=1e-4, atol=tolerance)
        assert_close_fp32("returns", got.returns, want_ret, rtol=1e-4, atol=tolerance)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gather_logprobs_within_twice_torchs_error(backend, device, dtype):
    from numerics import assert_within_2x, interpreter_rounding_floor

    @FUZZ
    @given(
        rows=st.integers(1, 5),
        vocab=st.integers(2, 300),
        scale=st.sampled_from([1.0, 8.0, 60.0]),
        seed=st.integers(0, 2**31),
    )
    def check(rows, vocab, scale, seed):
        logits_low = _tensor(seed, (rows, vocab), scale).to(dtype)
        labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 1))
        want = reference.gather_logprobs(logits_low.double(), labels)
        # torch in the low dtype, on the same device
        logits_low, labels = on_device(device, logits_low, labels)
        torch_low = torch.log_softmax(logits_low, -1).gather(-1, labels[:, None])[:, 0]
        got = ops.gather_logprobs(logits_low, labels, backend=backend)
        floor = 1e-6 + interpreter_rounding_floor(backend, dtype, want)
        assert_within_2x("logprobs", got, want, torch_low, floor=floor)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_kl_penalty_within_twice_torchs_error(backend, device, dtype):
    from numerics import assert_within_2x

    @FUZZ
    @given(
        shape=st.tuples(st.integers(1, 4), st.integers(1, 90)),
        estimator=st.sampled_from(["k1", "k2", "k3", "abs"]),
        spread=st.sampled_from([0.5, 3.0, 8.0]),
        seed=st.integers(0, 2**31),
    )
    def check(shape, estimator, spread, seed):
        generator = torch.Generator().manual_seed(seed)
        a = (-torch.rand(shape, generator=generator) * spread).to(dtype)
        b = (-torch.rand(shape, generator=generator) * spread).to(dtype)
        mask = torch.rand(shape, generator=generator) < 0.8
        want = reference.kl_penalty(a.double(), b.double(), mask, estimator=estimator)
        a, b, mask = on_device(device, a, b, mask)
        d = a - b  # torch in the low dtype: the same formulas, no upcast
        lowp = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1, "abs": d.abs()}[estimator] * mask
        got = ops.kl_penalty(a, b, mask, estimator=estimator, backend=backend)
        assert_within_2x(f"kl {estimator}", got, want, lowp)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_linear_logprobs_within_twice_torchs_error(backend, device, dtype):
    from numerics import assert_within_2x

    @FUZZ
    @given(
        rows=st.integers(1, 9),
        hidden_size=st.integers(1, 40),
        vocab=st.integers(2, 200),
        seed=st.integers(0, 2**31),
    )
    def check(rows, hidden_size, vocab, seed):
        hidden = _tensor(seed, (rows, hidden_size), 1.0).to(dtype)
        weight = _tensor(seed + 1, (vocab, hidden_size), 1.0 / hidden_size**0.5).to(dtype)
        labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 2))
        want = reference.linear_logprobs(hidden.double(), weight.double(), labels)
        hidden, weight, labels = on_device(device, hidden, weight, labels)
        # torch in the low dtype: low-precision logits, then the log-softmax (which torch runs upcast).
        logits = hidden @ weight.T
        torch_lowp = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        got = ops.linear_logprobs(hidden, weight, labels, backend=backend)
        assert_within_2x("logprobs", got, want, torch_lowp)

    check()


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_loss_and_advantage_ops_compute_in_fp32(backend, device, dtype):
    """gae, ranking_loss, group_advantages, ppo_policy_loss and value_loss take bf16/fp16 inputs and
    compute in fp32: their results equal the float64 reference on the same (rounded) inputs to fp32
    accuracy, far inside the 2x-of-torch rule (torch in the low dtype is off by its own rounding)."""

    @FUZZ
    @given(
        shape=st.tuples(st.integers(1, 4), st.integers(2, 40)),
        scale=st.sampled_from([0.1, 1.0, 10.0]),
        seed=st.integers(0, 2**31),
    )
    def check(shape, scale, seed):
        def low(i, s=scale):
            return _tensor(seed + i, shape, s).to(dtype)

        mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 9)) < 0.8
        rewards, values = low(0), low(1)
        got_adv, got_ret = ops.gae(*on_device(device, rewards, values, mask), 1.0, 0.95, backend=backend)
        want_adv, want_ret = reference.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
        bound = 1e-5 * scale * shape[1]
        assert_close_fp32("gae advantages", got_adv, want_adv, rtol=1e-5, atol=bound)
        assert_close_fp32("gae returns", got_ret, want_ret, rtol=1e-5, atol=bound)

        ranks = torch.randint(1, shape[1] + 1, shape, generator=torch.Generator().manual_seed(seed + 10))
        got = ops.ranking_loss(*on_device(device, low(2), ranks), backend=backend)
        want = reference.ranking_loss(low(2).double(), ranks)
        assert_close_fp32("ranking loss", got.loss, want.loss, rtol=1e-5, atol=1e-5)

        scores = low(3)  # [B, k]: k = shape[1] responses per prompt, 5 tokens each
        tokens = torch.rand(shape[0] * shape[1], 5, generator=torch.Generator().manual_seed(seed + 11)) < 0.8
        got_group = ops.group_advantages(*on_device(device, scores, tokens), "rloo", backend=backend)
        want_group = reference.group_advantages(scores.double(), tokens, "rloo")
        assert_close_fp32(
            "group advantages", got_group.advantages, want_group[0], rtol=1e-5, atol=1e-5 * scale
        )

        if backend == "torch":  # the loss ops have one implementation
            logprobs, old = -low(4, 1.0).abs(), -low(5, 1.0).abs()
            got_p = ops.ppo_policy_loss(*on_device(device, logprobs, old, low(6, 1.0), mask))
            want_p = reference.ppo_policy_loss(logprobs.double(), old.double(), low(6, 1.0).double(), mask)
            assert_close_fp32("policy loss", got_p.loss, want_p.loss, rtol=1e-5, atol=1e-6)
            got_v = ops.value_loss(*on_device(device, low(7), low(8), low(9), mask))
            want_v = reference.value_loss(low(7).double(), low(8).double(), low(9).double(), mask)
            assert_close_fp32("value loss", got_v.loss, want_v.loss, rtol=1e-5, atol=1e-6)

    check()
