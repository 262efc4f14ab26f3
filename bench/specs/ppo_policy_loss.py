"""ppo_policy_loss from hidden states: eager logprobs + the clipped loss against the fused op (and Liger's
fused linear GRPO loss, the nearest peer: the same clipped surrogate over a chunked lm_head)."""

from __future__ import annotations

import math

import torch

from fastrlhf.ops import linear_ppo_policy_loss
from specs._base import (
    Case,
    Provider,
    Target,
    batch_shape,
    compiled_provider,
    kernel_providers,
    peer_provider,
    random_mask,
    with_call_overhead,
)

OP = "ppo_policy_loss"
MODES = ("fwd", "bwd", "full")
DTYPES = {"cpu": ["fp32"], "cuda": ["bf16"]}
BATCH = 8
SIZES = {
    "cpu": [(1024, 512, 32000), (4096, 512, 32000)],
    "cuda": [(4096, 4096, 32000), (16384, 4096, 151936)],
}
QUICK_SIZES = [(128, 64, 4000), (256, 64, 4000)]
# The smallest valid input: its time is the cost of a call (dispatch, checks, launches), not of work.
CALL_SIZE = (2, 8, 16)
CLIP = 0.2
TARGETS = [Target("fwd", "N=2,H=8,V=16", "cpu", "call_us", 10.0, source="cost of a call ≤ 10 µs")]


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
    shape = batch_shape(n, BATCH)
    hidden = torch.randn(*shape, h, generator=generator).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=generator) * (2.0 / math.sqrt(h))).to(dtype).to(device)
    labels = torch.randint(0, v, shape, generator=generator)
    mask = random_mask(shape, generator, "cpu")
    with torch.no_grad():  # old log-probs near the current ones, so some ratios clip
        logits = hidden.float().cpu() @ weight.float().cpu().T
        now = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        del logits
    seq_adv = torch.randn(shape[0], generator=generator)
    return {
        "hidden": hidden.requires_grad_(requires_grad),
        "weight": weight.requires_grad_(requires_grad),
        "labels": labels.to(device),
        "mask": mask.to(device),
        "old": (now + 0.1 * torch.randn(shape, generator=generator)).to(device),
        # one advantage per sequence, as GRPO has it, so Liger's loss takes the same numbers
        "seq_adv": seq_adv.to(device),
        "adv": seq_adv[:, None].expand(shape).contiguous().to(device),
    }


def eager(inputs):
    """A trainer's eager step: full logits, fp32 log-softmax, gather, clipped surrogate, token mean."""
    labels, mask = inputs["labels"], inputs["mask"]
    logp_all = torch.log_softmax((inputs["hidden"] @ inputs["weight"].T).float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - inputs["old"])
    adv = inputs["adv"]
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    return (loss * mask).sum() / mask.sum()


def _liger_grpo():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # beta=0, no reference: the plain clipped surrogate; "bnpo" = the token mean over the batch
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0,
        use_ref_model=False,
        loss_type="bnpo",
        epsilon_low=CLIP,
        epsilon_high=CLIP,
        compiled=torch.cuda.is_available(),
    )

    def run(inputs):
        out = loss_fn(
            inputs["hidden"],
            inputs["weight"],
            inputs["labels"],
            inputs["mask"].float(),
            inputs["seq_adv"],
            old_per_token_logps=inputs["old"],
        )
        return out[0] if isinstance(out, tuple) else out

    return run


def providers(device: str) -> list[Provider]:
    out = [
        Provider("eager", eager),
        compiled_provider(eager, device),
        peer_provider("liger-grpo", "liger_kernel.chunked_loss", _liger_grpo),
    ]
    out += kernel_providers(
        device,
        lambda b: (
            lambda inputs: (
                linear_ppo_policy_loss(
                    inputs["hidden"],
                    inputs["weight"],
                    inputs["labels"],
                    inputs["old"],
                    inputs["adv"],
                    inputs["mask"],
                    clip_eps=CLIP,
                    backend=b,
                ).loss
            )
        ),
    )
    return out


def bytes_moved(case, dtype, mode):
    return None  # GEMM-bound
