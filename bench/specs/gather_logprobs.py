"""gather_logprobs: log-softmax + gather over ``[B, T, V]`` logits (B=8, as a trainer feeds them)."""

from __future__ import annotations

import dataclasses

import torch

from fastrlhf.ops import gather_logprobs
from specs._base import (
    Case,
    Provider,
    Target,
    batch_shape,
    compiled_provider,
    kernel_providers,
    peer_provider,
    with_call_overhead,
)

OP = "gather_logprobs"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "bf16"]}
BATCH = 8
SIZES = {
    "cpu": [(2048, 32000), (8192, 32000), (2048, 151936)],
    "cuda": [(8192, 32000), (16384, 151936), (32768, 151936)],
}
QUICK_SIZES = [(256, 4000), (512, 8000)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8)
TARGETS = [
    Target("fwd", "N=8192,V=32000", "cpu", "speedup", 5.0, source="forward ≥ 5x eager"),
    Target(
        "fwd",
        "N=8192,V=32000",
        "cpu",
        "time_ratio",
        1.3,
        baseline="read-once",
        source="forward memory-bound: ≤ 1.3x one read of the logits",
    ),
    Target("fwd", "N=8192,V=32000", "cpu", "speedup", 2.0, baseline="trl", source="forward ≥ 2x TRL"),
    Target(
        "fwd",
        "N=8192,V=32000",
        "cpu",
        "memory_fraction",
        0.01,
        reference_bytes=8192 * 32000 * 4,
        source="forward memory ≤ 1% of the fp32 logits",
    ),
    Target("full", "N=8192,V=32000", "cpu", "speedup", 4.0, source="forward+backward ≥ 4x eager"),
    Target("full", "N=8192,V=32000", "cpu", "memory_ratio", 1.0, source="forward+backward memory ≤ eager"),
    Target(
        "bwd",
        "N=8192,V=32000",
        "cpu",
        "copy_fraction",
        0.5,
        source="backward (read the logits, write their gradient) ≥ half the copy bandwidth",
    ),
    Target("fwd", "N=2,V=8", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs"),
]


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [Case(f"N={n},V={v}", n * v, {"tokens": n, "vocab": v}) for n, v in [CALL_SIZE, *sizes]]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    tokens, vocab = case.params["tokens"], case.params["vocab"]
    shape = batch_shape(tokens, BATCH)
    logits = torch.empty(*shape, vocab, dtype=dtype, device=device)
    for b in range(shape[0]):  # filled per sequence so no fp32 [N, V] temporary inflates the baseline
        logits[b] = (torch.randn(shape[1], vocab, generator=generator) * 2.0).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.05] = -100
    return {"logits": logits.requires_grad_(requires_grad), "labels": labels.to(device)}


def eager(inputs):
    """What trainers write by hand: a full fp32 log-softmax, then a gather."""
    labels = inputs["labels"]
    logp = torch.log_softmax(inputs["logits"].float(), dim=-1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _trl_selective():
    from trl.trainer.utils import selective_log_softmax

    def run(inputs):
        labels = inputs["labels"]
        return selective_log_softmax(inputs["logits"], labels.clamp_min(0)) * (labels != -100)

    return run


def _trl_triton_with_entropy():
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    def run(inputs):
        labels = inputs["labels"]
        logprobs, entropy = selective_log_softmax_and_entropy(inputs["logits"], labels.clamp_min(0))
        return (logprobs + entropy) * (labels != -100)

    return run


def providers(device: str) -> list[Provider]:
    out = [
        Provider("eager", eager),
        compiled_provider(eager, device),
        # One read of the logits: the floor under any forward that must look at every logit.
        Provider("read-once", lambda inputs: inputs["logits"].sum(), modes=("fwd",)),
        peer_provider("trl", "trl.trainer.utils", _trl_selective),
    ]
    if device == "cuda":
        out.append(
            peer_provider("trl-triton+entropy", "trl.kernels.logprob_entropy", _trl_triton_with_entropy)
        )
    else:
        out.append(
            Provider("trl-triton+entropy", None, "TRL's Triton logprob+entropy kernel needs a CUDA device")
        )
    out += kernel_providers(
        device, lambda b: lambda inputs: gather_logprobs(inputs["logits"], inputs["labels"], backend=b)
    )
    if device == "cuda":
        # Like for like with TRL's kernel, which always computes the entropy too.
        out += [
            dataclasses.replace(p, name=p.name + "+entropy") for p in kernel_providers(device, _with_entropy)
        ]
    return out


def _with_entropy(backend):
    def run(inputs):
        logprobs, entropy = gather_logprobs(
            inputs["logits"], inputs["labels"], return_entropy=True, backend=backend
        )
        return logprobs + entropy

    return run


def bytes_moved(case, dtype, mode):
    """Read the logits once forward; read them and write d(logits) once backward (labels, outputs: small)."""
    n, v = case.params["tokens"], case.params["vocab"]
    elt = torch.empty(0, dtype=dtype).element_size()
    forward = n * v * elt + n * (8 + 4 + 8)
    backward = 2 * n * v * elt + n * (8 + 4 + 8)
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode]
