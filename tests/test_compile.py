"""gather_logprobs and linear_logprobs are ops torch.compile traces with no graph break (TORCH_LIBRARY ops
on the C++ / CUDA backends, torch.library custom ops on Triton), on the C++ backend on the CPU and on every
GPU backend; so is linear_ppo_policy_loss on C++ / CUDA. opcheck finds the Python custom ops' schema, fake
and autograd registrations consistent on each device."""

import pytest
import torch
from conftest import op_targets, triton_targets

from fastrlhf.ops import gather_logprobs

# The interpreted Triton backend is left out on the CPU: compiling around the interpreter proves nothing.
COMPILED_TARGETS = [p for p in op_targets(include_torch=False) if p.id != "cpu-triton"]
OPCHECK_DEVICES = [pytest.param("cpu", id="cpu")] + [
    pytest.param("cuda", marks=p.marks, id="gpu") for p in op_targets() if p.id == "gpu-cuda"
]


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_compiled_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()

    def loss_fn(hidden, weight, labels):
        logits = hidden @ weight.T
        lp, ent = gather_logprobs(logits, labels, temperature=0.8, return_entropy=True, backend=backend)
        return -(lp.sum() + 0.01 * ent.sum())

    hidden = torch.randn(12, 32, device=device)
    weight = torch.randn(301, 32, device=device, requires_grad=True)
    labels = torch.randint(0, 301, (12,), device=device)
    labels[3] = -100
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_loss = loss_fn(hidden, weight, labels)
    (eager_grad,) = torch.autograd.grad(eager_loss, weight)
    compiled_loss = compiled(hidden, weight, labels)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, weight)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def _compiled_backend(device: str) -> str:
    """The compiled backend of a device (cpp on the CPU, cuda on the GPU), or a skip saying why not."""
    from fastrlhf.ops import available_backends

    name = "cpp" if device == "cpu" else "cuda"
    info = available_backends()[name]
    if not (info.available and device in info.devices):
        pytest.skip(f"{name}: {info.reason}")
    return name


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
def test_opcheck_custom_op(device):
    """torch.library.opcheck: schema, fake impl and autograd registration are consistent."""
    backend = _compiled_backend(device)
    logits = torch.randn(5, 33, device=device, requires_grad=True)
    labels = torch.randint(0, 33, (5,), device=device)
    torch.library.opcheck(
        torch.ops.fastrlhf.gather_logprobs_fwd.default,
        (logits, labels, 1.25, -100, True, False, backend),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("backend,device", triton_targets())
@pytest.mark.parametrize("rows", [3, -1], ids=["seq-mean", "token-mean"])
def test_opcheck_kl_triton_mean_and_backward_ops(backend, device, rows):
    """The Triton KL mean and its backward as custom ops: schema, fake impl and autograd registration
    consistent (the interpreter runs the kernels on the CPU)."""
    logprobs = (-torch.rand(21, device=device) * 3).requires_grad_()
    ref = (-torch.rand(21, device=device) * 3).requires_grad_()
    mask = (torch.rand(21, device=device) > 0.3).to(torch.uint8)
    mean_op = torch.ops.fastrlhf.kl_penalty_mean_fwd.default
    args = (logprobs, ref, mask, 2, float("inf"), rows, backend)
    torch.library.opcheck(
        mean_op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
    mean, normalizer = mean_op(*args)
    grad = torch.randn(mean.shape, device=device)
    backward_args = (
        grad,
        logprobs.detach(),
        ref.detach(),
        mask,
        normalizer,
        2,
        float("inf"),
        rows,
        True,
        backend,
    )
    torch.library.opcheck(
        torch.ops.fastrlhf.kl_penalty_bwd.default,
        backward_args,
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_linear_logprobs_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    from fastrlhf.ops import linear_logprobs

    def loss_fn(hidden, weight, bias, labels):
        lp, ent = linear_logprobs(
            hidden, weight, labels, bias, 0.9, return_entropy=True, chunk_size=5, backend=backend
        )
        return -(lp.sum() + 0.01 * ent.sum())

    hidden = torch.randn(13, 24, device=device, requires_grad=True)
    weight = torch.randn(301, 24, device=device, requires_grad=True)
    bias = torch.randn(301, device=device, requires_grad=True)
    labels = torch.randint(0, 301, (13,), device=device)
    labels[4] = -100
    eager_loss = loss_fn(hidden, weight, bias, labels)
    eager_grads = torch.autograd.grad(eager_loss, (hidden, weight, bias))
    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_loss = compiled(hidden, weight, bias, labels)
    compiled_grads = torch.autograd.grad(compiled_loss, (hidden, weight, bias))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", [p for p in COMPILED_TARGETS if p.values[0] in ("cpp", "cuda")])
def test_linear_ppo_policy_loss_compiles_fullgraph(backend, device):
    """The fused PPO loss on cpp / cuda is one TORCH_LIBRARY op: no graph break, and the gradient of a
    scaled loss (the stored gradients times the incoming one) matches eager."""
    torch._dynamo.reset()
    from fastrlhf.ops import linear_ppo_policy_loss

    def loss_fn(hidden, weight, bias, labels, old, adv, mask, ref):
        out = linear_ppo_policy_loss(
            hidden,
            weight,
            labels,
            old,
            adv,
            mask,
            bias=bias,
            temperature=0.9,
            ref_logprobs=ref,
            kl_coef=0.05,
            entropy_coef=0.01,
            loss_agg="seq-mean-token-mean",
            chunk_size=5,
            backend=backend,
        )
        return 2.5 * out.loss, out.clip_fraction

    hidden = torch.randn(3, 7, 24, device=device, requires_grad=True)
    weight = torch.randn(301, 24, device=device, requires_grad=True)
    bias = torch.randn(301, device=device, requires_grad=True)
    labels = torch.randint(0, 301, (3, 7), device=device)
    labels[1, 4] = -100
    old, ref = -torch.rand(3, 7, device=device) * 6, -torch.rand(3, 7, device=device) * 6
    adv, mask = torch.randn(3, 7, device=device), torch.rand(3, 7, device=device) > 0.2
    args = (hidden, weight, bias, labels, old, adv, mask, ref)
    eager_loss, eager_clip = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager_loss, (hidden, weight, bias))
    compiled = torch.compile(loss_fn, fullgraph=True)
    compiled_loss, compiled_clip = compiled(*args)
    compiled_grads = torch.autograd.grad(compiled_loss, (hidden, weight, bias))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_clip, eager_clip, rtol=0, atol=0)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", OPCHECK_DEVICES)
def test_opcheck_linear_logprobs_ops(device):
    backend = _compiled_backend(device)
    hidden = torch.randn(7, 16, device=device, requires_grad=True)
    weight = torch.randn(45, 16, device=device, requires_grad=True)
    bias = torch.randn(45, device=device, requires_grad=True)
    labels = torch.randint(0, 45, (7,), device=device)
    for b in (bias, None):
        torch.library.opcheck(
            torch.ops.fastrlhf.linear_logprobs_fwd.default,
            (hidden, weight, b, labels, 1.1, -100, True, 3, b is not None, backend),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
    lp, stats, ent = torch.ops.fastrlhf.linear_logprobs_fwd(
        hidden, weight, bias, labels, 1.1, -100, True, 3, True, backend
    )
    torch.library.opcheck(
        torch.ops.fastrlhf.linear_logprobs_bwd.default,
        (
            torch.randn(7, device=device),
            torch.randn(7, device=device),
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
            backend,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("backend,device", COMPILED_TARGETS)
def test_kl_ranking_and_advantage_ops_compile_fullgraph(backend, device):
    """The eager calls skip the custom ops' dispatch (ops/_dispatch.py); compiled, the same calls go
    through the custom ops: both give the same values and gradients."""
    check_kl_ranking_and_advantage_ops_compiled(backend, device, "inductor")


@pytest.mark.parametrize(
    "backend,device", [p for p in op_targets(include_torch=False) if p.id == "cpu-triton"]
)
def test_triton_path_traces_fullgraph_around_the_interpreter(backend, device):
    """The Python around the Triton kernels traces without a graph break (the interpreted kernels run
    behind their custom ops, so aot_eager traces the same code the GPU compiles): a data-dependent
    check there failed only on a GPU before."""
    check_kl_ranking_and_advantage_ops_compiled(backend, device, "aot_eager")


@pytest.mark.parametrize("backend,device", [p for p in op_targets() if p.id in ("cpu-torch", "cpu-triton")])
def test_traced_mask_handling_avoids_a_bool_to_uint8_view(backend, device):
    """The graph handed to inductor holds no bool -> uint8 ``view``: torch 2.11's inductor cannot lower one
    (an H200 run failed on it), and the CPU's newer torch can, so the graph itself is checked."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    check_kl_ranking_and_advantage_ops_compiled(backend, device, aot_autograd(fw_compiler=capture))
    bool_views = [
        node
        for graph_module in graphs
        for node in graph_module.graph.nodes
        if node.target is torch.ops.aten.view.dtype and node.args[0].meta["val"].dtype is torch.bool
    ]
    assert graphs and not bool_views, f"bool -> uint8 views in the traced graph: {bool_views}"


def check_kl_ranking_and_advantage_ops_compiled(backend: str, device: str, compiler) -> None:
    torch._dynamo.reset()
    from fastrlhf.ops import compute_advantages, gae, group_advantages, kl_penalty, ranking_loss

    def loss_fn(logprobs, ref, mask, rewards, ranks, values):
        kl = kl_penalty(logprobs, ref, mask, "k3", reduction="seq-mean", backend=backend)
        ranked = ranking_loss(rewards, ranks, backend=backend)
        advantages, returns = gae(
            -kl.detach()[:, None].expand_as(values), values, mask, 1.0, 0.95, backend=backend
        )
        experience = compute_advantages(
            kl.detach(), logprobs.detach(), ref, values, mask, 0.05, "k3", score_clip=1.0, backend=backend
        )
        grouped = group_advantages(rewards.detach(), mask[:1].expand(20, 17), backend=backend)
        rpp = group_advantages(
            rewards.detach()[:2], mask[:2, None].expand(2, 5, 17), "reinforce++", gamma=0.9, backend=backend
        )
        return kl.sum() + ranked.loss, advantages, returns, *experience, *grouped, *rpp

    logprobs = -torch.rand(3, 17, device=device).requires_grad_()
    ref = -torch.rand(3, 17, device=device)
    mask = torch.rand(3, 17, device=device) < 0.8
    rewards = torch.randn(4, 5, device=device, requires_grad=True)
    ranks = torch.randint(1, 6, (4, 5), device=device)
    values = torch.randn(3, 17, device=device)
    inputs = (logprobs, ref, mask, rewards, ranks, values)
    eager = loss_fn(*inputs)
    eager_grads = torch.autograd.grad(eager[0], (logprobs, rewards))
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)(*inputs)
    compiled_grads = torch.autograd.grad(compiled[0], (logprobs, rewards))
    for got, want in zip((*compiled, *compiled_grads), (*eager, *eager_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", [p for p in COMPILED_TARGETS if p.values[0] in ("cpp", "cuda")])
def test_ppo_policy_loss_compiles_fullgraph(backend, device):
    """The log-prob form's TORCH_LIBRARY op traces with no graph break; values and gradients match eager."""
    torch._dynamo.reset()
    from fastrlhf.ops import ppo_policy_loss

    def loss_fn(logprobs, old, adv, mask, ref, entropy):
        out = ppo_policy_loss(
            logprobs,
            old,
            adv,
            mask,
            0.2,
            0.28,
            3.0,
            ref,
            0.05,
            "k3",
            entropy,
            0.01,
            "seq-mean-token-mean",
            backend=backend,
        )
        return out.loss, out.clip_fraction, out.approx_kl, out.entropy, out.ref_kl

    old = -torch.rand(3, 17, device=device)
    logprobs = (old + 0.3 * torch.randn(3, 17, device=device)).requires_grad_()
    entropy = torch.rand(3, 17, device=device, requires_grad=True)
    inputs = (
        logprobs,
        old,
        torch.randn(3, 17, device=device),
        torch.rand(3, 17, device=device) < 0.8,
        old + 0.1,
        entropy,
    )
    eager = loss_fn(*inputs)
    eager_grads = torch.autograd.grad(eager[0], (logprobs, entropy))
    compiled = torch.compile(loss_fn, fullgraph=True)(*inputs)
    compiled_grads = torch.autograd.grad(compiled[0], (logprobs, entropy))
    for got, want in zip((*compiled, *compiled_grads), (*eager, *eager_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_constant_marker_is_the_one_torch_sets():
    """The ops mark their backend queries constant for torch.compile without importing it; the mark must
    be the very one ``torch.compiler.assume_constant_result`` sets."""
    from fastrlhf.ops._backend import constant_for_compile

    def ours():
        return 1

    def torchs():
        return 1

    assert constant_for_compile(ours) is ours
    torch.compiler.assume_constant_result(torchs)
    assert vars(ours) == vars(torchs) and vars(ours)
