"""linear_logprobs: log-probs straight from hidden states ``[N, H]`` and an lm_head ``[V, H]``."""

from __future__ import annotations

import math

import torch

from fastrlhf.ops import linear_logprobs
from specs._base import (
    Case,
    Provider,
    Target,
    compiled_provider,
    kernel_providers,
    peer_provider,
    with_call_overhead,
)

OP = "linear_logprobs"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32"], "cuda": ["bf16"]}
SIZES = {
    "cpu": [(1024, 512, 32000), (4096, 512, 32000)],
    "cuda": [(4096, 4096, 32000), (16384, 4096, 151936)],
}
QUICK_SIZES = [(128, 64, 4000), (256, 64, 4000)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8, 16)
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: the vocabulary tile TRL's trainers use
TARGETS = [
    Target("full", "N=4096,H=512,V=32000", "cpu", "memory_ratio", 0.05, source="memory ≤ 0.05x eager"),
    Target("full", "N=4096,H=512,V=32000", "cpu", "time_ratio", 1.0, source="time ≤ eager"),
    Target("fwd", "N=2,H=8,V=16", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs"),
    Target(
        "full",
        "N=16384,H=4096,V=151936",
        "cuda",
        "memory_ratio",
        1.0,
        baseline="liger-flce",
        dtype="bf16",
        source="memory ≤ Liger's fused linear path",
    ),
    Target(
        "full",
        "N=16384,H=4096,V=151936",
        "cuda",
        "speedup",
        1.0,
        baseline="liger-flce",
        dtype="bf16",
        source="time ≤ Liger's fused linear path",
    ),
]


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [
            Case(f"N={n},H={h},V={v}", n * v, {"tokens": n, "hidden": h, "vocab": v})
            for n, h, v in [CALL_SIZE, *sizes]
        ]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    n, h, v = case.params["tokens"], case.params["hidden"], case.params["vocab"]
    hidden = torch.randn(n, h, generator=generator).to(dtype).to(device)
    # lm_head scale: logits of a few nats, neither flat nor one-hot
    weight = (torch.randn(v, h, generator=generator) * (2.0 / math.sqrt(h))).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.05] = -100
    return {
        "hidden": hidden.requires_grad_(requires_grad),
        "weight": weight.requires_grad_(requires_grad),
        "labels": labels.to(device),
    }


def eager(inputs):
    """The full logits, an fp32 log-softmax, a gather."""
    labels = inputs["labels"]
    logp = torch.log_softmax((inputs["hidden"] @ inputs["weight"].T).float(), dim=-1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _trl_chunked():
    from trl.kernels import ChunkedLogProbFunction

    def run(inputs):
        labels = inputs["labels"]
        out = ChunkedLogProbFunction.apply(
            inputs["hidden"], inputs["weight"], None, labels.clamp_min(0), 1.0, TRL_CHUNK, None, 1.0, ()
        )
        return out[0] * (labels != -100)

    return run


def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def run(inputs):
        # Σ -logp over valid tokens: the same work as Σ linear_logprobs, as one fused loss
        return -loss_fn(inputs["weight"], inputs["hidden"], inputs["labels"])

    return run


def providers(device: str) -> list[Provider]:
    out = [
        Provider("eager", eager),
        compiled_provider(eager, device),
        peer_provider("trl-chunked", "trl.kernels", _trl_chunked),
    ]
    if device == "cuda":
        out.append(peer_provider("liger-flce", "liger_kernel.transformers", _liger_flce, modes=("full",)))
    else:
        out.append(Provider("liger-flce", None, "Liger's fused linear cross entropy is Triton: CUDA only"))
    out += kernel_providers(
        device,
        lambda b: (
            lambda inputs: linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"], backend=b)
        ),
    )
    return out


def bytes_moved(case, dtype, mode):
    return None  # GEMM-bound: bandwidth is not its limit
