"""The update: ``--ppo-epochs`` passes over a rollout's experience in minibatches, one optimizer step each.

Per micro-batch: the clipped policy loss fused with the log-probs (``ops.linear_ppo_policy_loss``, at the
sampling temperature), plus ``vf_coef`` x the clipped value loss when there is a critic, plus ``β·KL`` when
the penalty sits in the loss; then, with PPO-ptx, the LM loss on pretraining text into the same gradient
buffers before the one optimizer step.

The PPO-ptx term is ``γ · mean|A| · NLL_ptx``: γ times the mean absolute advantage of the micro-batch's
response tokens times the mean negative log-likelihood of the pretraining tokens. The policy loss weighs
each response token's gradient by its advantage, so it carries a total weight of ``mean|A|`` per token;
scaling the LM term by the same ``mean|A|`` makes γ the LM term's weight *relative to the RL term*, the
same whether the advantages are whitened, in raw reward units or group-normalised, and whatever the
response and text lengths (both terms are token means). InstructGPT's γ = 27.8 multiplies a raw LM loss
set against its own loss scale; on this definition the two do not compare (see the docs).
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

import torch
from accelerate.utils import send_to_device

from fastrlhf import ops
from fastrlhf.data.batching import IGNORE_INDEX, model_inputs, pad_batch
from fastrlhf.train.guards import NonFiniteGuard, clip_and_check
from fastrlhf.train.rollout import Rollout, micro_batches, select_rows
from fastrlhf.train.zero import gradient_sync

if TYPE_CHECKING:
    from fastrlhf.train.experience import Experience
    from fastrlhf.train.ppo import PPOConfig


def ppo_update(
    model,
    accelerator,
    optimizer,
    scheduler,
    rollout: Rollout,
    experience: Experience,
    config: PPOConfig,
    kl_coef: float,
    ptx_stream=None,
    ema=None,
    guard: NonFiniteGuard | None = None,
    step: int = 0,
) -> tuple[list[dict], float | None, float | None]:
    """``--ppo-epochs`` passes over the rollout: per minibatch, the micro-batches' backward passes (with
    PPO-ptx when ``ptx_stream`` is given), clipping, one optimizer (and scheduler, when given) step, and
    the EMA update. With a ``guard``, a minibatch whose loss or gradient norm is not finite is not stepped
    (its gradients are dropped). ``step``: the PPO step, for the guard's messages. Returns ``(per-micro-
    batch stats, the first micro-batch's approx KL, last grad norm)``.
    """
    stats, first_epoch_approx_kl, grad_norm = [], None, None
    rows = torch.arange(rollout.rows, device=rollout.mask.device)
    for epoch in range(config.ppo_epochs):
        # Epoch 0 keeps the experience pass's row blocks, so its ratio is exactly 1; later epochs shuffle.
        order = rows if epoch == 0 else rows[torch.randperm(rows.numel(), device="cpu").to(rows.device)]
        for minibatch in micro_batches(order, config.minibatch_size):
            blocks = micro_batches(minibatch, config.micro_batch_size)
            for index, block in enumerate(blocks):
                micro = {**select_rows(rollout, block), **experience.rows(block)}
                ptx = next(ptx_stream) if ptx_stream is not None else None
                last = index == len(blocks) - 1
                stats.append(
                    backward_micro_batch(
                        model, accelerator, micro, ptx, config, kl_coef, last, experience.on_policy
                    )
                )
                if first_epoch_approx_kl is None:
                    first_epoch_approx_kl = float(stats[-1]["policy/approx_kl"])
            losses = [
                s["policy/loss"] + s.get("value/loss", 0.0) + s.get("ptx/loss", 0.0)
                for s in stats[-len(blocks) :]
            ]
            finite, grad_norm = clip_and_check(accelerator, model, config.max_grad_norm, guard, step, losses)
            if finite:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None and finite:
                ema.update(accelerator.unwrap_model(model).policy_lm)
    return stats, first_epoch_approx_kl, grad_norm


def backward_micro_batch(
    model,
    accelerator,
    micro: dict,
    ptx: dict | None,
    config: PPOConfig,
    kl_coef: float,
    sync: bool,
    on_policy: bool = False,
) -> dict:
    """Forward and backward of one micro-batch: the clipped policy loss (+ ``β·KL`` with the penalty in the
    loss) + ``vf_coef`` x the clipped value loss (with a critic), then PPO-ptx's LM loss into the same
    gradient buffers.

    ``micro``: ``select_rows`` output plus ``Experience.rows`` (``old_logprobs``, ``ref_logprobs``,
    ``advantages``, and ``old_values``, ``returns`` with a critic), ``[b, T]``. ``ptx``: ``{"inputs",
    "targets"}`` of a pretraining batch, or None. ``sync``: whether this micro-batch's last backward
    all-reduces the gradients (under DDP). ``on_policy``: ``micro["old_logprobs"]`` are the sampler's, and
    π_old is this forward's own log-probs (``Experience.on_policy``); the stats then carry the gap between
    the two. Returns detached scalar stats.
    """
    head = accelerator.unwrap_model(model).lm_head
    keep = micro["mask"]
    ones = torch.ones(int(keep.sum()), dtype=torch.bool, device=keep.device)
    kl_in_loss = config.kl_penalty == "loss" and kl_coef > 0
    # Only the micro-batch's last backward may reduce the gradients and end the accumulation.
    with gradient_sync(accelerator, model, sync and ptx is None):
        hidden, values = model(**micro["inputs"])
        policy = ops.linear_ppo_policy_loss(
            hidden[keep],
            head.weight,
            micro["targets"][keep],
            None if on_policy else micro["old_logprobs"][keep],
            micro["advantages"][keep],
            ones,
            bias=head.bias,
            temperature=config.temperature,
            clip_eps=config.clip_eps,
            clip_eps_high=config.clip_eps_high,
            ref_logprobs=micro["ref_logprobs"][keep] if kl_in_loss else None,
            kl_coef=kl_coef if kl_in_loss else 0.0,
            kl_estimator=config.kl_estimator,
            entropy_coef=config.entropy_coef,
            compute_entropy=True,
        )
        loss = policy.loss
        stats = {
            "policy/loss": policy.loss.detach(),
            "policy/clip_fraction": policy.clip_fraction,
            "policy/approx_kl": policy.approx_kl,
            "policy/entropy": policy.entropy,
        }
        if on_policy:
            # The sampler's log-probs (KV-cached decoding) against this full forward's: equal in exact
            # arithmetic (same weights, same temperature), so the gap is numerics, or a sampler bug.
            gap = (policy.logprobs - micro["old_logprobs"][keep]).abs()
            stats["rollout/logprob_gap_mean"] = gap.mean() if gap.numel() else gap.new_zeros(())
            stats["rollout/logprob_gap_max"] = gap.max() if gap.numel() else gap.new_zeros(())
        if values is not None:
            value = ops.value_loss(
                values[keep].float(),
                micro["old_values"][keep],
                micro["returns"][keep],
                ones,
                clip=config.value_clip or None,
            )
            loss = loss + config.vf_coef * value.loss
            stats.update({"value/loss": value.loss.detach(), "value/clip_fraction": value.clip_fraction})
        accelerator.backward(loss)
    if ptx is not None:
        with gradient_sync(accelerator, model, sync):
            hidden, values = model(**ptx["inputs"])
            selected = ptx["targets"] != IGNORE_INDEX
            lm_logprobs = ops.linear_logprobs(
                hidden[selected], head.weight, ptx["targets"][selected], bias=head.bias
            )
            ptx_loss = -lm_logprobs.mean()
            weight = config.ptx_coef * micro["advantages"][keep].abs().mean()
            # 0 x values keeps the critic's parameters in this backward's graph, which DDP requires of
            # every parameter in a synchronising backward; it adds exactly nothing to the gradients.
            critic_in_graph = 0.0 * values.float().sum() if values is not None else 0.0
            accelerator.backward(weight * ptx_loss + critic_in_graph)
        stats.update({"ptx/loss": ptx_loss.detach(), "ptx/weight": weight.detach()})
    return stats


def ptx_batches(sequences, batch_size: int, seed: int, pad_token_id: int, device):
    """An endless stream of pretraining micro-batches, reshuffled each pass (seeded)."""
    for epoch in itertools.count():
        order = list(range(len(sequences)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            chunk = [sequences[i] for i in order[start : start + batch_size]]
            batch = send_to_device(pad_batch(chunk, pad_token_id), device)
            yield {"inputs": model_inputs(batch), "targets": batch["targets"]}
