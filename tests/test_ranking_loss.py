"""ranking_loss and pairwise_loss on every backend, on the CPU and (when one is present) the GPU, against the
float64 reference on the CPU (itself checked against an explicit pair enumeration in test_reference.py)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DispatchedOps, on_device, op_targets, triton_targets
from loops import ranking_loss_by_enumeration
from numerics import assert_close_fp32

from fastrlhf.ops import pairwise_loss, ranking_loss, reference


def make_case(n, k, ties=True):
    rewards = torch.randn(n, k) * 2
    ranks = torch.stack([torch.randperm(k) + 1 for _ in range(n)])
    mask = torch.ones(n, k, dtype=torch.bool)
    if n >= 4:
        mask[1, k // 2 :] = False  # a prompt with fewer responses
        mask[2, 1:] = False  # a single response: no pair
        if ties:
            ranks[3] = 1  # all tied: no pair
    if ties and k >= 3 and n >= 1:
        ranks[0, 1] = ranks[0, 2]
    return rewards, ranks, mask


def run(backend, device, rewards, ranks, mask, margin=0.0):
    """The op on ``device``: its output (on ``device``) and d loss / d rewards (on the CPU)."""
    r, on_ranks, on_mask = on_device(device, rewards.detach(), ranks, mask)
    r.requires_grad_(True)
    out = ranking_loss(r, on_ranks, on_mask, margin, backend=backend)
    out.loss.backward()
    return out, r.grad.cpu()


def reference64(rewards, ranks, mask, margin=0.0):
    r = rewards.detach().double().requires_grad_(True)
    out = reference.ranking_loss(r, ranks, mask, margin)
    out.loss.backward()
    return out, r.grad


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("n,k", [(1, 2), (5, 3), (7, 9), (33, 16)])
@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_matches_reference(backend, device, n, k, margin):
    rewards, ranks, mask = make_case(n, k)
    out, grad = run(backend, device, rewards, ranks, mask, margin)
    want, want_grad = reference64(rewards, ranks, mask, margin)
    assert_close_fp32("loss", out.loss, want.loss)
    assert_close_fp32("accuracy", out.accuracy, want.accuracy)
    assert out.num_prompts_without_pairs.item() == want.num_prompts_without_pairs.item()
    assert_close_fp32("grad", grad, want_grad)


@pytest.mark.parametrize("backend,device", op_targets())
def test_stable_at_huge_gaps(backend, device):
    rewards = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
    ranks = torch.tensor([[1, 2, 3], [1, 2, 3]])
    out, grad = run(backend, device, rewards, ranks, None)
    want, want_grad = reference64(rewards, ranks, None)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert_close_fp32("loss", out.loss, want.loss)
    assert_close_fp32("grad", grad, want_grad)


@pytest.mark.parametrize("backend,device", op_targets())
def test_pairwise_is_k2_chosen_rejected(backend, device):
    chosen, rejected = torch.randn(11, device=device), torch.randn(11, device=device)
    chosen.requires_grad_(True), rejected.requires_grad_(True)
    margin = torch.rand(11)
    out = pairwise_loss(chosen, rejected, margin.to(device), backend=backend)
    out.loss.backward()
    c, r = (t.detach().cpu().double().requires_grad_(True) for t in (chosen, rejected))
    want = -F.logsigmoid(c - r - margin.double()).mean()
    want.backward()
    assert_close_fp32("loss", out.loss, want)
    assert_close_fp32("d chosen", chosen.grad, c.grad)
    assert_close_fp32("d rejected", rejected.grad, r.grad)
    assert out.accuracy.item() == pytest.approx((c > r).float().mean().item())


@pytest.mark.parametrize("backend,device", triton_targets())
def test_triton_mean_over_prompts_is_in_its_kernels(backend, device):
    """The Triton path's mean over prompts (over more prompts than one loop step of the shared epilogue)
    and its backward run no torch arithmetic; loss, accuracy, the int64 count of prompts without a pair
    and the gradient against float64."""
    rewards, ranks, _ = make_case(1100, 3)
    ranks[40:60] = 2  # prompts without a pair (all tied); no mask, whose 0/1 check would sync
    r, on_ranks = on_device(device, rewards.clone(), ranks)
    r.requires_grad_(True)
    with DispatchedOps() as forward_ops:
        out = ranking_loss(r, on_ranks, None, 0.3, backend=backend)
    with DispatchedOps() as backward_ops:
        out.loss.backward()
    arithmetic = {"add", "sub", "mul", "div", "neg", "sum", "mean", "clamp_min", "gt", "eq", "where", "clone"}
    arithmetic |= {"zeros", "fill_", "zero_"}
    assert not forward_ops.names & arithmetic, sorted(forward_ops.names)
    assert not backward_ops.names & arithmetic, sorted(backward_ops.names)
    want, want_grad = reference64(rewards, ranks, None, 0.3)
    assert_close_fp32("loss", out.loss.detach().cpu(), want.loss)
    assert_close_fp32("accuracy", out.accuracy.cpu(), want.accuracy)
    assert out.num_prompts_without_pairs.dtype == torch.int64
    assert out.num_prompts_without_pairs.item() == want.num_prompts_without_pairs.item() >= 21
    assert_close_fp32("grad", r.grad.cpu(), want_grad)


def test_bf16_rewards_compute_in_fp32():
    rewards, ranks, mask = make_case(6, 4)
    out = ranking_loss(rewards.bfloat16(), ranks, mask)
    want = reference.ranking_loss(rewards.bfloat16().double(), ranks, mask)
    assert_close_fp32("loss", out.loss, want.loss)


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_scales_with_the_upstream_gradient_and_keeps_the_rewards_dtype(backend, device, dtype):
    """The loss enters a larger graph (here times 2.5, next to another term of the rewards): their
    gradient is the upstream gradient times d loss / d rewards, in the rewards' own dtype. The compiled
    backends take d loss / d rewards out of the forward's pass over the pairs, so this checks the product."""
    rewards, ranks, mask = make_case(9, 5)
    r, on_ranks, on_mask = on_device(device, rewards.to(dtype), ranks, mask)
    r.requires_grad_(True)
    out = ranking_loss(r, on_ranks, on_mask, 0.2, backend=backend)
    (2.5 * out.loss + r.float().sum()).backward()
    r64 = rewards.to(dtype).double().detach().requires_grad_(True)
    want = reference.ranking_loss(r64, ranks, mask, 0.2)
    (2.5 * want.loss + r64.sum()).backward()
    assert r.grad.dtype == dtype
    if dtype == torch.float32:
        assert_close_fp32("grad", r.grad, r64.grad)
    else:
        # Computed in fp32, rounded to bf16 (half an ulp: 2^-8 relative) and summed in bf16 with the
        # other term's gradient of 1 (another half ulp).
        torch.testing.assert_close(r.grad.double().cpu(), r64.grad, rtol=2**-7, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.ops.fastrlhf, "ranking_loss_with_grad"), reason="no compiled extension")
def test_the_with_grad_op_returns_d_loss_d_rewards():
    rewards, ranks, mask = make_case(13, 6)
    loss, accuracy, without, d_rewards = torch.ops.fastrlhf.ranking_loss_with_grad(rewards, ranks, mask, 0.4)
    r64 = rewards.double().requires_grad_(True)
    want = reference.ranking_loss(r64, ranks, mask, 0.4)
    want.loss.backward()
    assert_close_fp32("loss", loss, want.loss)
    assert_close_fp32("d loss / d rewards", d_rewards, r64.grad)
    assert d_rewards.dtype == torch.float32 and int(without) == int(want.num_prompts_without_pairs)
    assert (d_rewards[2] == 0).all() and (d_rewards[3] == 0).all(), "prompts without pairs get no gradient"


def test_validation():
    r = torch.randn(3, 4)
    ranks = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="K=1 responses per prompt; a ranking needs K >= 2"):
        ranking_loss(r[:, :1], ranks[:, :1])
    with pytest.raises(ValueError, match="every prompt with fewer than 2 responses"):
        ranking_loss(r, ranks, torch.tensor([[1, 0, 0, 0]] * 3))
    with pytest.raises(ValueError, match=r"ranks has shape \(3, 3\)"):
        ranking_loss(r, ranks[:, :3])
    with pytest.raises(ValueError, match="ranks has dtype float32"):
        ranking_loss(r, ranks.float())
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        ranking_loss(r, ranks, torch.full((3, 4), 3))
    with pytest.raises(ValueError, match="margin must be finite"):
        ranking_loss(r, ranks, margin=float("nan"))
    with pytest.raises(ValueError, match="one device"):
        ranking_loss(r, ranks.to("meta"))


@pytest.mark.parametrize("backend,device", op_targets())
@pytest.mark.parametrize("k", [2, 4, 9])
def test_random_ranks_with_ties_against_brute_force(backend, device, k):
    """Random ranks drawn with replacement (many ties), random masks: values and gradients against an
    itertools enumeration of the pairs with float64 autograd (tests/loops.py)."""
    n = 12
    rewards = torch.randn(n, k) * 3
    ranks = torch.randint(1, k + 1, (n, k))
    mask = torch.rand(n, k) > 0.25
    mask[0] = True
    margin = 0.3
    out, grad = run(backend, device, rewards, ranks, mask, margin)
    r64 = rewards.double().requires_grad_(True)
    want_loss, want_acc, want_skipped = ranking_loss_by_enumeration(r64, ranks, mask, margin)
    want_loss.backward()
    assert_close_fp32("loss", out.loss, want_loss.detach())
    assert out.accuracy.item() == pytest.approx(want_acc, abs=1e-6)
    assert out.num_prompts_without_pairs.item() == want_skipped
    assert_close_fp32("grad", grad, r64.grad)
