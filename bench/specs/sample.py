"""sample: one token per row of ``[B, V]`` logits, plain (temperature only) and with top-p = 0.9.

Baselines: ``softmax + multinomial`` (eager, what most RLHF rollouts do per step) and the sampler in
transformers' ``generate`` (its logits warpers, then softmax + multinomial), restated from
``GenerationMixin._sample``. Forward only: sampling has no gradient.
"""

from __future__ import annotations

import torch

from fastrlhf.ops import sample
from specs._base import (
    Case,
    Provider,
    Target,
    compiled_provider,
    kernel_providers,
    peer_provider,
    with_call_overhead,
)

OP = "sample"
MODES = ("fwd",)
DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}
TEMPERATURE = 0.9
SIZES = {
    "cpu": [(64, 32000, 1.0), (64, 32000, 0.9), (256, 32000, 1.0)],
    "cuda": [(64, 32000, 1.0), (64, 32000, 0.9), (256, 128256, 1.0), (256, 128256, 0.9)],
}
QUICK_SIZES = [(16, 1000, 1.0), (16, 1000, 0.9)]
CALL_SIZE = (2, 16, 1.0)
TARGETS = [
    Target("fwd", "B=64,V=32000", "cpu", "speedup", 3.0, source="ops.sample ≥ 3x softmax + multinomial"),
]


def _label(batch, vocab, top_p):
    return f"B={batch},V={vocab}" + ("" if top_p == 1.0 else f",top_p={top_p}")


def cases(device: str, quick: bool) -> list[Case]:
    sizes = QUICK_SIZES if quick else SIZES[device]
    return with_call_overhead(
        [
            Case(_label(b, v, p), b * v, {"batch": b, "vocab": v, "top_p": p})
            for b, v, p in [CALL_SIZE, *sizes]
        ]
    )


def make_inputs(case, device, dtype, requires_grad, generator):
    shape = (case.params["batch"], case.params["vocab"])
    # A language model's scale: a few dominant tokens over a long tail.
    logits = torch.randn(shape, generator=generator) * 3
    return {"logits": logits.to(dtype).to(device), "top_p": case.params["top_p"]}


def eager(inputs):
    """softmax + multinomial; top-p by the usual sort / cumsum / scatter when the case asks for it."""
    logits = inputs["logits"] / TEMPERATURE
    if inputs["top_p"] < 1.0:
        logits = _top_p_sorted(logits, inputs["top_p"])
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


def _top_p_sorted(logits, top_p):
    ordered, index = logits.sort(-1, descending=True)
    mass = ordered.softmax(-1).cumsum(-1)
    drop = mass - ordered.softmax(-1) > top_p  # keep up to and including the token that crosses top_p
    return logits.scatter(-1, index, ordered.masked_fill(drop, -torch.inf))


def transformers_sampler():
    """transformers' sampling step: its temperature and top-p warpers, softmax, multinomial."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = {}

    def run(inputs):
        top_p = inputs["top_p"]
        if top_p not in warpers:
            chain = [TemperatureLogitsWarper(TEMPERATURE)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
            warpers[top_p] = LogitsProcessorList(chain)
        scores = warpers[top_p](None, inputs["logits"].float())
        return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)

    return run


def providers(device: str) -> list[Provider]:
    return [
        Provider("eager", eager),
        compiled_provider(eager, device),
        peer_provider("transformers-generate", "transformers", transformers_sampler),
        *kernel_providers(
            device,
            lambda b: (
                lambda inputs: sample(inputs["logits"], TEMPERATURE, top_p=inputs["top_p"], backend=b).tokens
            ),
        ),
    ]


def bytes_moved(case, dtype, mode):
    """Read the logits once; write a token and a log-prob per row."""
    batch, vocab = case.params["batch"], case.params["vocab"]
    return batch * vocab * torch.empty(0, dtype=dtype).element_size() + batch * 12
