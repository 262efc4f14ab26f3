"""gather_logprobs is a torch.library custom op: torch.compile traces it with no graph break."""

import pytest
import torch
from conftest import cpu_backends

from fastrlhf.ops import gather_logprobs


@pytest.mark.parametrize("backend", [p for p in cpu_backends(include_torch=False) if p.id == "cpp"])
def test_compiled_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def loss_fn(hidden, weight, labels):
        logits = hidden @ weight.T
        lp, ent = gather_logprobs(logits, labels, temperature=0.8, return_entropy=True, backend=backend)
        return -(lp.sum() + 0.01 * ent.sum())

    hidden = torch.randn(12, 32)
    weight = torch.randn(301, 32, requires_grad=True)
    labels = torch.randint(0, 301, (12,))
    labels[3] = -100
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(hidden, weight, labels)
    (eager_grad,) = torch.autograd.grad(eager_loss, weight)
    compiled_loss = compiled(hidden, weight, labels)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, weight)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_opcheck_custom_op():
    """torch.library.opcheck: schema, fake impl and autograd registration are consistent."""
    from fastrlhf.ops import available_backends

    if not available_backends()["cpp"].available:
        pytest.skip("no C++ extension")
    logits = torch.randn(5, 33, requires_grad=True)
    labels = torch.randint(0, 33, (5,))
    torch.library.opcheck(
        torch.ops.fastrlhf.gather_logprobs_fwd.default,
        (logits, labels, 1.25, -100, True, False, "cpp"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend", [p for p in cpu_backends(include_torch=False) if p.id == "cpp"])
def test_linear_logprobs_compiles_fullgraph(backend):
    torch._dynamo.reset()
    from fastrlhf.ops import linear_logprobs

    def loss_fn(hidden, weight, bias, labels):
        lp, ent = linear_logprobs(
            hidden, weight, labels, bias, 0.9, return_entropy=True, chunk_size=5, backend=backend
        )
        return -(lp.sum() + 0.01 * ent.sum())

    hidden = torch.randn(13, 24, requires_grad=True)
    weight = torch.randn(301, 24, requires_grad=True)
    bias = torch.randn(301, requires_grad=True)
    labels = torch.randint(0, 301, (13,))
    labels[4] = -100
    eager_loss = loss_fn(hidden, weight, bias, labels)
    eager_grads = torch.autograd.grad(eager_loss, (hidden, weight, bias))
    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_loss = compiled(hidden, weight, bias, labels)
    compiled_grads = torch.autograd.grad(compiled_loss, (hidden, weight, bias))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_opcheck_linear_logprobs_ops():
    from fastrlhf.ops import available_backends

    if not available_backends()["cpp"].available:
        pytest.skip("no C++ extension")
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(45, 16, requires_grad=True)
    bias = torch.randn(45, requires_grad=True)
    labels = torch.randint(0, 45, (7,))
    for b in (bias, None):
        torch.library.opcheck(
            torch.ops.fastrlhf.linear_logprobs_fwd.default,
            (hidden, weight, b, labels, 1.1, -100, True, 3, "cpp"),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
    lp, stats, ent = torch.ops.fastrlhf.linear_logprobs_fwd(
        hidden, weight, bias, labels, 1.1, -100, True, 3, "cpp"
    )
    torch.library.opcheck(
        torch.ops.fastrlhf.linear_logprobs_bwd.default,
        (
            torch.randn(7),
            torch.randn(7),
            hidden.detach(),
            weight.detach(),
            bias.detach(),
            labels,
            stats,
            ent,
            1.1,
            -100,
            3,
            True,
            False,
            True,
            "cpp",
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
