"""ops.sample on every backend: the tokens the float64 reference draws at the same uniforms, chi-square
tests of the empirical distribution against the exact truncated one, transformers' warpers as the
independent definition of top-k / top-p / min-p, seeds, and the errors."""

import importlib

import pytest
import torch
from conftest import op_targets
from numerics import assert_close_fp32

from fastrlhf.ops import reference, sample
from fastrlhf.ops.sample import sample_uniforms

# The module (the package's ``sample`` attribute is the function of the same name).
sample_module = importlib.import_module("fastrlhf.ops.sample")

# (top_k, top_p, min_p): no truncation, each alone, all three, and top-k = 1 (greedy).
TRUNCATIONS = {
    "none": (None, 1.0, 0.0),
    "top_k": (17, 1.0, 0.0),
    "top_p": (None, 0.8, 0.0),
    "min_p": (None, 1.0, 0.05),
    "all": (40, 0.9, 0.02),
    "greedy": (1, 1.0, 0.0),
}
# Relative distance to a CDF boundary or a threshold inside which fp32 and float64 may disagree.
AMBIGUOUS = 1e-5


def random_logits(rows, vocab, dtype=torch.float32, device="cpu"):
    """Logits on the scale of a language model's (a few dominant tokens, a long tail), some -inf."""
    logits = torch.randn(rows, vocab, dtype=torch.float64) * 2.5
    logits[torch.rand(rows, vocab) < 0.02] = -torch.inf
    logits[:, 0] = 0.0  # no row is all -inf
    return logits.to(dtype).to(device)


def unambiguous_rows(logits64, uniforms, temperature, top_k, top_p, min_p):
    """Rows where fp32 kernels must draw the reference's token: the uniform is not within rounding of a
    CDF boundary, and no kept token sits within rounding of the truncation threshold."""
    t, kept, _ = reference.truncated_support(logits64, temperature, top_k or 0, top_p, min_p)
    e = t.exp()
    weights = torch.where(kept, e, 0.0)
    running = weights.cumsum(-1)
    total = running[:, -1:]
    target = uniforms[:, None] * total
    # The drawn token's interval of the running mass: (running before it, running at it].
    token = (running <= target).sum(-1, keepdim=True).clamp_max(running.shape[-1] - 1)
    upper = running.gather(-1, token)
    lower = upper - weights.gather(-1, token)
    near_boundary = (
        ((upper - target).abs() < AMBIGUOUS * total) | ((target - lower).abs() < AMBIGUOUS * total)
    )[:, 0]
    # A threshold is ambiguous when the smallest kept e and the largest dropped e are within rounding,
    # or top-p's running mass passes top_p within rounding.
    smallest_kept = torch.where(kept, e, torch.inf).amin(-1)
    largest_dropped = torch.where(kept | (e == 0), -torch.inf, e).amax(-1)
    near_threshold = (smallest_kept - largest_dropped).abs() < AMBIGUOUS * smallest_kept
    near_top_p = torch.zeros_like(near_threshold)
    if top_p < 1.0:
        ranked = torch.where(e >= _top_k_floor(e, top_k), e, 0.0)
        ranked = ranked.sort(-1, descending=True).values
        mass = ranked.cumsum(-1)
        near_top_p = ((mass - top_p * mass[:, -1:]).abs() < AMBIGUOUS * mass[:, -1:]).any(-1)
    return ~(near_boundary | near_threshold | near_top_p)


def _top_k_floor(e, top_k):
    """The top-k threshold on e ([B, 1]), 0 without top-k."""
    if not top_k or top_k >= e.shape[-1]:
        return torch.zeros(e.shape[0], 1, dtype=e.dtype)
    return e.topk(top_k, dim=-1).values[:, -1:]


def reference_cases() -> list:
    """Every backend x dtype x truncation, except that the Triton interpreter (seconds a case) reads the
    16-bit dtypes with every truncation at once only."""
    cases = []
    for target in op_targets():
        backend, device = target.values
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for truncation in TRUNCATIONS:
                interpreted = backend == "triton" and device == "cpu"
                if interpreted and dtype != torch.float32 and truncation != "all":
                    continue
                name = f"{target.id}-{str(dtype).replace('torch.', '')}-{truncation}"
                cases.append(pytest.param(backend, device, dtype, truncation, marks=target.marks, id=name))
    return cases


@pytest.mark.parametrize("backend, device, dtype, truncation", reference_cases())
def test_tokens_and_logprobs_match_the_float64_reference(backend, device, dtype, truncation):
    top_k, top_p, min_p = TRUNCATIONS[truncation]
    # The Triton interpreter runs each row's program in numpy, about 0.1 s a row: fewer, narrower rows.
    interpreted = backend == "triton" and device == "cpu"
    rows, vocab = (24, 301) if interpreted else (48, 997 if backend != "triton" else 301)
    temperature = 0.7
    logits = random_logits(rows, vocab, dtype, device)
    generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, ())))
    state = generator.get_state()
    got = sample(
        logits, temperature, top_k, top_p, min_p, generator=generator, return_entropy=True, backend=backend
    )
    uniforms = sample_uniforms(rows, device, generator=generator.set_state(state)).cpu()
    logits64 = logits.cpu().double()
    want = reference.sample(logits64, uniforms, temperature, top_k or 0, top_p, min_p, return_entropy=True)

    clear = unambiguous_rows(logits64, uniforms, temperature, top_k, top_p, min_p)
    assert int(clear.sum()) >= rows * 0.8, "too few unambiguous rows to test"
    tokens = got.tokens.cpu()
    assert tokens.dtype == torch.int64 and tokens.shape == (rows,)
    mismatched = (tokens != want.tokens) & clear
    assert not bool(mismatched.any()), f"rows {mismatched.nonzero().flatten().tolist()} drew other tokens"
    same = tokens == want.tokens
    assert_close_fp32("logprobs", got.logprobs.cpu()[same], want.logprobs[same], rtol=1e-5, atol=5e-5)
    entropy_rows = clear  # the kept set (hence the entropy) is the reference's wherever the rows are clear
    assert_close_fp32(
        "entropy", got.entropy.cpu()[entropy_rows], want.entropy[entropy_rows], rtol=1e-5, atol=5e-5
    )
    if truncation == "greedy":
        # top-k = 1 keeps the maximum and every token tied with it (common in 16-bit logits), uniformly.
        row_max = logits64.amax(-1)
        assert torch.equal(logits64.gather(-1, tokens[:, None])[:, 0], row_max)
        ties = (logits64 == row_max[:, None]).sum(-1).double()
        assert_close_fp32("greedy logprobs", got.logprobs.cpu(), -ties.log(), rtol=1e-6, atol=1e-6)
        assert_close_fp32("greedy entropy", got.entropy.cpu(), ties.log(), rtol=1e-6, atol=1e-6)


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test; bins expected below 5 draws are pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


@pytest.mark.parametrize("truncation", ["none", "top_k", "top_p", "min_p", "all"])
@pytest.mark.parametrize("backend, device", [t for t in op_targets() if t.values[0] != "triton"])
def test_empirical_distribution_passes_a_chi_square_test(backend, device, truncation):
    """The frequencies of 40,000 draws from one row match its exact truncated distribution, and no token
    outside the kept set is ever drawn. (Triton draws the reference's tokens at the same uniforms, tested
    above; its interpreter is too slow for 40,000 rows.)"""
    top_k, top_p, min_p = TRUNCATIONS[truncation]
    draws, vocab = 40_000, 61
    row = random_logits(1, vocab).double() / 2
    t, kept, _ = reference.truncated_support(row, 1.3, top_k or 0, top_p, min_p)
    probs = torch.where(kept, t.exp(), 0.0)[0]
    probs /= probs.sum()
    logits = row.float().expand(draws, vocab).contiguous().to(device)
    tokens = sample(logits, 1.3, top_k, top_p, min_p, backend=backend).tokens.cpu()
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept[0]].sum() == 0, "drew tokens outside the kept set"
    p_value = chi_square_p_value(counts[kept[0]], draws * probs[kept[0]])
    assert p_value > 1e-4, f"chi-square p = {p_value:.2e}"


def test_kept_sets_match_transformers_warpers():
    """top-k, then top-p, then min-p, as transformers' generate applies them (no ties in random logits)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(64, 500, dtype=torch.float64) * 3
    for top_k, top_p, min_p in [
        (20, 1.0, 0.0),
        (0, 0.7, 0.0),
        (0, 1.0, 0.1),
        (50, 0.85, 0.03),
        (0, 0.3, 0.0),
    ]:
        scores = logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        if min_p:
            scores = MinPLogitsWarper(min_p)(None, scores)
        _, kept, _ = reference.truncated_support(logits, 1.0, top_k, top_p, min_p)
        assert torch.equal(kept, torch.isfinite(scores)), (top_k, top_p, min_p)


@pytest.mark.parametrize("backend, device", op_targets())
def test_same_seed_same_tokens(backend, device):
    logits = random_logits(16 if backend == "triton" and device == "cpu" else 32, 300, device=device)
    first = sample(logits, top_p=0.95, seed=1234, backend=backend)
    again = sample(logits, top_p=0.95, seed=1234, backend=backend)
    other = sample(logits, top_p=0.95, seed=4321, backend=backend)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other.tokens)
    torch.manual_seed(7)
    from_global = sample(logits, backend=backend).tokens
    torch.manual_seed(7)
    assert torch.equal(sample(logits, backend=backend).tokens, from_global)


@pytest.mark.parametrize("backend, device", op_targets())
def test_extreme_logits_and_leading_dimensions(backend, device):
    """Logits of ±1e4 (exp over- and underflows unless shifted) and a [2, 3, V] batch."""
    logits = torch.full((2, 3, 129), -1e4, device=device)
    logits[..., 77] = 1e4
    logits[0, 1, 5] = 1e4 - 1.0
    got = sample(logits, return_entropy=True, seed=3, backend=backend)
    assert got.tokens.shape == (2, 3) and got.logprobs.shape == (2, 3)
    assert bool(((got.tokens == 77) | (got.tokens == 5)).all())
    want = reference.sample(
        logits.reshape(6, 129).double().cpu(), sample_uniforms(6, device, seed=3).cpu(), return_entropy=True
    )
    assert torch.equal(got.tokens.reshape(6).cpu(), want.tokens)
    assert_close_fp32("logprobs", got.logprobs.reshape(6).cpu(), want.logprobs)
    assert_close_fp32("entropy", got.entropy.reshape(6).cpu(), want.entropy)


@pytest.mark.parametrize("backend, device", op_targets())
def test_empty_batches_single_rows_and_logits_that_require_grad(backend, device):
    """[0, V] gives empty results; a 1-D [V] row gives 0-d ones; logits that require grad give results
    that do not (and the same tokens as their detached copy)."""
    empty = sample(torch.randn(0, 9, device=device), return_entropy=True, backend=backend)
    assert empty.tokens.shape == (0,) and empty.logprobs.shape == (0,) and empty.entropy.shape == (0,)
    row = torch.randn(9, device=device)
    single = sample(row, seed=5, backend=backend)
    assert single.tokens.shape == () and single.logprobs.shape == ()
    assert torch.equal(single.tokens, sample(row[None], seed=5, backend=backend).tokens[0])
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    got = sample(logits, seed=5, return_entropy=True, backend=backend)
    assert not got.logprobs.requires_grad and not got.entropy.requires_grad
    assert torch.equal(got.tokens, sample(logits.detach(), seed=5, backend=backend).tokens)


@pytest.mark.parametrize("backend, device", op_targets())
def test_uniforms_at_the_ends_of_the_unit_interval(backend, device, monkeypatch):
    """u = 0 draws the first kept token, u just below 1 the last (never one outside the kept set)."""
    logits = random_logits(2, 200, device=device)
    logits[:, :3] = -torch.inf
    uniforms = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64, device=device)
    monkeypatch.setattr(sample_module, "sample_uniforms", lambda n, device, **_: uniforms)
    got = sample(logits, top_k=50, backend=backend).tokens.cpu()
    _, kept, _ = reference.truncated_support(logits.cpu().double(), 1.0, 50)
    positions = [row.nonzero().flatten() for row in kept]
    assert int(got[0]) == int(positions[0][0]) and int(got[1]) == int(positions[1][-1])


@pytest.mark.parametrize("backend, device", op_targets())
def test_bad_rows_are_named(backend, device):
    logits = torch.randn(5, 64, device=device)
    bad = logits.clone()
    bad[3, 10] = torch.nan
    with pytest.raises(ValueError, match=r"logits row 3 .*NaN at index 10"):
        sample(bad, backend=backend)
    bad = logits.clone()
    bad[1, 2] = torch.inf
    with pytest.raises(ValueError, match=r"logits row 1 .*\+inf at index 2"):
        sample(bad, backend=backend)
    bad = logits.clone()
    bad[4] = -torch.inf
    with pytest.raises(ValueError, match=r"logits row 4 .*only -inf"):
        sample(bad, backend=backend)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(top_k=-1), "top_k must be None or an int >= 0"),
        (dict(top_k=2.5), "top_k must be None or an int >= 0"),
        (dict(top_p=0.0), "top_p must be finite and > 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(seed=1, generator=torch.Generator()), "pass generator or seed, not both"),
        (dict(seed="1"), "seed must be an int"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(torch.randn(2, 10), **kwargs)


def test_bad_logits_are_named():
    with pytest.raises(ValueError, match="logits has dtype int64"):
        sample(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"logits must be \[\.\.\., V\] with V >= 1"):
        sample(torch.ones(3, 0))
