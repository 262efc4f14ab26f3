"""The plain-torch references (the spec) checked against independent scalar re-statements."""

import itertools
import math

import pytest
import torch
from loops import gae_mask_carry_loop, gae_right_padded_loop

from fastrlhf.ops import reference


def test_gather_logprobs_against_scalar_math():
    logits = torch.randn(3, 6, dtype=torch.float64)
    labels = torch.tensor([2, -100, 5])
    temperature = 0.7
    lp, ent = reference.gather_logprobs(logits, labels, temperature, return_entropy=True)
    for i in range(3):
        z = [v / temperature for v in logits[i].tolist()]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        probs = [math.exp(v - lse) for v in z]
        if labels[i] == -100:
            assert lp[i] == 0 and ent[i] == 0
        else:
            assert lp[i].item() == pytest.approx(z[labels[i]] - lse, abs=1e-12)
            assert ent[i].item() == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-12)


def test_gather_logprobs_output_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert (
            reference.gather_logprobs(torch.randn(2, 4).to(dtype), torch.tensor([0, 1])).dtype
            == torch.float32
        )


def test_linear_logprobs_is_gather_of_the_product():
    hidden, weight, bias = (
        torch.randn(5, 8, dtype=torch.float64),
        torch.randn(11, 8, dtype=torch.float64),
        torch.randn(11, dtype=torch.float64),
    )
    labels = torch.randint(0, 11, (5,))
    expected = reference.gather_logprobs(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(reference.linear_logprobs(hidden, weight, labels, bias), expected)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_estimators_against_scalar_math(estimator):
    logp = torch.randn(4, 5, dtype=torch.float64)
    ref = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.rand(4, 5) > 0.3
    kl = reference.kl_penalty(logp, ref, mask, estimator)
    formulas = {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
        "abs": lambda a, b: abs(a - b),
    }
    for i, j in itertools.product(range(4), range(5)):
        want = formulas[estimator](logp[i, j].item(), ref[i, j].item()) if mask[i, j] else 0.0
        assert kl[i, j].item() == pytest.approx(want, abs=1e-12)


def test_kl_k3_stays_finite_and_nonnegative_at_large_gaps():
    logp = torch.tensor([0.0, -50.0, 0.0, 1e-9])
    ref = torch.tensor([-50.0, 0.0, 0.0, 0.0])
    kl = reference.kl_penalty(logp, ref, estimator="k3")
    assert torch.isfinite(kl).all() and (kl >= 0).all()


def test_gae_with_holes_matches_mask_carry_loop():
    rewards, values = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    mask = torch.rand(4, 9) > 0.35
    mask[0] = False  # an empty row
    adv, ret = reference.gae(rewards, values, mask, 0.97, 0.9)
    want_adv, want_ret = gae_mask_carry_loop(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv, want_adv)
    torch.testing.assert_close(ret, want_ret)


def test_gae_right_padded_matches_trl_loop():
    rewards, values = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    lengths = [7, 4, 1]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    adv, _ = reference.gae(rewards, values, mask, 1.0, 0.95)
    for i, n in enumerate(lengths):
        want = gae_right_padded_loop(rewards[i].tolist(), values[i].tolist(), n, 1.0, 0.95)
        torch.testing.assert_close(adv[i], torch.tensor(want, dtype=torch.float64))


def test_masked_whiten():
    x = torch.randn(3, 8, dtype=torch.float64)
    mask = torch.rand(3, 8) > 0.3
    vals = x[mask]
    want = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8)
    out = reference.masked_whiten(x, mask)
    torch.testing.assert_close(out[mask], want)
    assert (out[~mask] == 0).all()


def scalar_ranking_loss(rewards, ranks, mask, margin):
    losses, accs, empty = [], [], 0
    for r, k, m in zip(rewards, ranks, mask, strict=True):
        idx = [i for i in range(len(r)) if m[i]]
        pairs = [(a, b) if k[a] < k[b] else (b, a) for a, b in itertools.combinations(idx, 2) if k[a] != k[b]]
        if not pairs:
            empty += 1
            continue
        # -log σ(x) = log(1 + e^{-x}), written stably for any sign of x.
        nls = [
            max(-x, 0) + math.log1p(math.exp(-abs(x))) for x in (r[w] - r[lose] - margin for w, lose in pairs)
        ]
        losses.append(sum(nls) / len(pairs))
        accs.append(sum(r[w] > r[lose] for w, lose in pairs) / len(pairs))
    loss = sum(losses) / len(losses) if losses else 0.0
    acc = sum(accs) / len(accs) if accs else 0.0
    return loss, acc, empty


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_ranking_loss_against_pair_enumeration(margin):
    n, k = 6, 5
    rewards = torch.randn(n, k, dtype=torch.float64) * 3
    ranks = torch.stack([torch.randperm(k) + 1 for _ in range(n)])
    ranks[1, 2] = ranks[1, 3]  # a tie, dropped
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[2, 3:] = False  # K=3 for this prompt
    mask[3, 1:] = False  # one response: no pair
    ranks[4] = 2  # all tied: no pair
    result = reference.ranking_loss(rewards, ranks, mask, margin)
    want_loss, want_acc, want_empty = scalar_ranking_loss(
        rewards.tolist(), ranks.tolist(), mask.tolist(), margin
    )
    assert result.loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert result.accuracy.item() == pytest.approx(want_acc, abs=1e-12)
    assert result.num_prompts_without_pairs.item() == want_empty == 2


def test_ranking_loss_stable_at_huge_gaps():
    rewards = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    ranks = torch.tensor([[1, 2], [1, 2]])
    result = reference.ranking_loss(rewards, ranks)
    result.loss.backward()
    assert torch.isfinite(result.loss) and torch.isfinite(rewards.grad).all()
    assert result.loss.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2
