"""sample: one token per row from tempered, truncated logits, with its log-prob, in one fused kernel.

``softmax + multinomial`` writes a ``[B, V]`` probability tensor and walks it again to draw. The kernels
read each row of logits and keep nothing of row size in memory but an L2-resident scratch (CPU) or
nothing at all (GPU): a max pass, an exp-sum pass, the truncation thresholds (only when truncating), then
an inverse-CDF walk at one uniform per row. The uniforms come from torch's generator, so the same seed
gives the same tokens, and every backend maps ``(logits, uniforms)`` to the same token except where the
uniform falls within rounding of a boundary of the CDF. The exact rule is ``reference.sample``'s.

Truncation matches transformers' logits warpers (``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``, applied in that order), except that tokens tied at a threshold are all kept.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, pick_backend, runs_compiled_op
from fastrlhf.ops._dispatch import kernel_op
from fastrlhf.ops._kernels import compiled, triton_module
from fastrlhf.ops._validation import FLOAT_DTYPES, check_positive_finite, check_tensor
from fastrlhf.ops.reference import SampleResult

__all__ = ["SampleResult", "sample", "sample_uniforms"]


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> SampleResult:
    """Sample one token per row of ``logits`` and return its log-prob under the distribution sampled.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 / float64; every leading position is one draw.
            NaN and +inf are errors, and so is a row of only -inf; other -inf entries are never drawn.
        temperature: divides the logits; finite and > 0.
        top_k: keep the k most likely tokens (ties at the k-th all kept); None or 0 keeps all.
        top_p: keep the smallest most-likely set whose probability reaches top_p, after top-k; in (0, 1].
        min_p: keep tokens with probability >= min_p times the most likely one's; in [0, 1).
        generator: torch generator of the uniforms (one float64 per row), on the logits' device; default
            torch's global one, so ``torch.manual_seed`` fixes the draw.
        seed: instead of a generator: a fresh one seeded with it. The same seed gives the same tokens.
        return_entropy: also return each row's entropy under the truncated distribution.
    Returns:
        ``SampleResult(tokens int64 [...], logprobs float32 [...] (float64 for float64 logits), entropy or
        None)``. No gradient flows (score the tokens with ``gather_logprobs`` to train on them).
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    temperature = check_positive_finite("temperature", temperature)
    top_k = check_top_k(top_k)
    top_p, min_p = check_top_p(top_p), check_min_p(min_p)
    # A decode step's [B, V] logits need no reshape and its [B] results no view back: each costs more than
    # the kernel on a small batch (a view to a torch.Size is parsed as a shape of symbolic ints).
    flat = logits.dim() == 2
    rows = logits if flat else logits.reshape(-1, logits.shape[-1])
    if rows.requires_grad:
        rows = rows.detach()
    uniforms = sample_uniforms(rows.shape[0], rows.device, generator=generator, seed=seed)

    if backend == "auto" and runs_compiled_op(backend, rows):  # the common call: the C++ or CUDA kernel
        chosen = COMPILED_OP_BACKENDS[rows.device.type]
    else:
        chosen = pick_backend(backend, rows.device, dict(logits=rows))
    if chosen == "torch":
        result = reference.sample(rows, uniforms, temperature, top_k, top_p, min_p, return_entropy)
    else:
        tokens, logprobs, entropy = _sample_op(
            rows.contiguous(), uniforms, 1.0 / temperature, top_k, top_p, min_p, return_entropy, chosen
        )
        result = SampleResult(tokens, logprobs, entropy if return_entropy else None)
    check_sampled_rows(rows, result.tokens)
    if flat:
        return result
    shape = tuple(logits.shape[:-1])
    entropy = None if result.entropy is None else result.entropy.view(shape)
    return SampleResult(result.tokens.view(shape), result.logprobs.view(shape), entropy)


def sample_uniforms(
    n: int, device: torch.device, *, generator: torch.Generator | None = None, seed: int | None = None
) -> torch.Tensor:
    """The ``[n]`` float64 uniforms in [0, 1) that ``sample`` draws with, from ``generator`` or ``seed``."""
    if generator is not None and seed is not None:
        raise ValueError("pass generator or seed, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        generator = torch.Generator(device=device).manual_seed(seed)
    if generator is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but logits are on {device}")
    return torch.rand(n, dtype=torch.float64, device=device, generator=generator)


def check_top_k(top_k) -> int:
    """None or 0 → 0 (no top-k); otherwise an int >= 1."""
    if top_k is None:
        return 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be None or an int >= 0 (0 keeps every token), got {top_k!r}")
    return top_k


def check_top_p(top_p) -> float:
    value = check_positive_finite("top_p", top_p)
    if value > 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return value


def check_min_p(min_p) -> float:
    try:
        value = float(min_p)
    except (TypeError, ValueError):
        raise ValueError(f"min_p must be a number in [0, 1), got {min_p!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
    return value


def check_sampled_rows(rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Every backend marks a row it cannot sample with token -1; name the first one and what is wrong.

    One reduction (a sync on CUDA); the rows themselves are only inspected when one is bad.
    """
    if tokens.numel() == 0 or int(tokens.min()) >= 0:  # one reduction, the cheapest test of a small batch
        return
    row = int((tokens < 0).nonzero()[0, 0])
    values = rows[row]
    if bool(torch.isnan(values).any()):
        what = f"a NaN at index {int(torch.isnan(values).nonzero()[0, 0])}"
    elif bool((values == torch.inf).any()):
        what = f"+inf at index {int((values == torch.inf).nonzero()[0, 0])}"
    elif bool((values == -torch.inf).all()):
        what = "only -inf values: no token has any probability"
    else:
        what = "a value that overflows to inf once divided by the temperature"
    raise ValueError(f"logits row {row} (of {rows.shape[0]}, leading dims flattened) has {what}")


@kernel_op("fastrlhf::sample_fwd")
def _sample_op(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    inv_temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    with_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[B, V]`` contiguous, uniforms f64 ``[B]`` → tokens i64 ``[B]``, logprobs f32 ``[B]``,
    entropy f32 ``[B]`` (``[0]`` without ``with_entropy``)."""
    module = triton_module("sample") if backend == "triton" else compiled()
    return module.sample_forward(logits, uniforms, inv_temperature, top_k, top_p, min_p, with_entropy)


@_sample_op.register_fake
def _(logits, uniforms, inv_temperature, top_k, top_p, min_p, with_entropy, backend):
    rows = logits.shape[0]
    return (
        logits.new_empty(rows, dtype=torch.int64),
        logits.new_empty(rows, dtype=torch.float32),
        logits.new_empty(rows if with_entropy else 0, dtype=torch.float32),
    )
