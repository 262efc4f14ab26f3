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
from fastrlhf.data.batching import model_inputs, pad_batch
from fastrlhf.models.policy import target_logprobs
from fastrlhf.train.guards import NonFiniteGuard, clip_and_check
from fastrlhf.train.rollout import Rollout, micro_batches, select_rows
from fastrlhf.train.unwrap import unwrap_model
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
                ema.update(unwrap_model(accelerator, model).policy_lm)
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

    With a separate critic (and no sharding engine), the policy's loss is backpropagated before the
    critic's forward: the two trunks' saved activations never coexist, which lowers the step's peak memory
    by one trunk's activations. The gradients are the same: the two losses share no parameter.
    """
    actor_critic = unwrap_model(accelerator, model)
    keep = micro["mask"]
    ones = torch.ones(int(keep.sum()), dtype=torch.bool, device=keep.device)
    split = backpropagates_parts_apart(accelerator, actor_critic)
    policy_part = "policy" if split else "both"
    # Only the micro-batch's last backward may reduce the gradients and end the accumulation.
    last_is_here = sync and ptx is None
    distributed = accelerator.num_processes > 1
    with gradient_sync(accelerator, model, last_is_here and not split):
        (loss, stats), values = model(
            part=policy_part,
            head_fn=lambda hidden, head: _policy_loss(
                hidden[keep], head, micro, keep, ones, config, kl_coef, on_policy
            ),
            **micro["inputs"],
        )
        if not split and values is not None:
            value_loss, value_stats = _value_loss(values, micro, keep, ones, config)
            loss, stats = loss + value_loss, stats | value_stats
        accelerator.backward(loss)
    if split:
        with gradient_sync(accelerator, model, last_is_here):
            _, values = model(part="critic", **micro["inputs"])
            value_loss, value_stats = _value_loss(values, micro, keep, ones, config)
            stats.update(value_stats)
            # A synchronising DDP backward must reach every parameter: the policy's join with weight 0.
            tie = _in_graph_with_zero_weight(actor_critic.policy_lm) if last_is_here and distributed else 0.0
            accelerator.backward(value_loss + tie)
    if ptx is not None:
        with gradient_sync(accelerator, model, sync):
            lm_logprobs, values = model(
                part=policy_part, head_fn=target_logprobs(ptx["targets"]), **ptx["inputs"]
            )
            ptx_loss = -lm_logprobs.mean()
            weight = config.ptx_coef * micro["advantages"][keep].abs().mean()
            # The critic joins this backward with weight 0, as DDP requires of every parameter in a
            # synchronising backward: through its values when the forward ran it, else through its weights.
            if values is not None:
                tie = 0.0 * values.float().sum()
            elif split:
                tie = _in_graph_with_zero_weight(actor_critic.critic) if sync and distributed else 0.0
            else:
                tie = 0.0
            accelerator.backward(weight * ptx_loss + tie)
        stats.update({"ptx/loss": ptx_loss.detach(), "ptx/weight": weight.detach()})
    return stats


def backpropagates_parts_apart(accelerator, actor_critic) -> bool:
    """Whether the policy's and the separate critic's losses get a backward each (``backward_micro_batch``).

    Only without a sharding engine: FSDP reduces a module's gradients only after a backward that its own
    forward preceded, and DeepSpeed ZeRO reduces every backward's gradients into its partitions, so there
    the one forward runs both models and one backward follows."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    return actor_critic.mode == "separate" and actor_critic.critic is not None and not sharded


def _in_graph_with_zero_weight(module) -> torch.Tensor:
    """0 x the sum of ``module``'s trainable parameters: added to a loss, it puts each of them in the
    backward's graph with a zero gradient, so that a synchronising DDP backward reduces the gradients they
    accumulated in an earlier, non-synchronising one."""
    return 0.0 * sum(p.sum() for p in module.parameters() if p.requires_grad)


def _policy_loss(hidden, head, micro, keep, ones, config, kl_coef, on_policy) -> tuple[torch.Tensor, dict]:
    """The fused clipped policy loss of the kept rows ``hidden[N, H]`` (+ β·KL in the loss), and its stats."""
    kl_in_loss = config.kl_penalty == "loss" and kl_coef > 0
    policy = ops.linear_ppo_policy_loss(
        hidden,
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
    return policy.loss, stats


def _value_loss(values, micro, keep, ones, config) -> tuple[torch.Tensor, dict]:
    """``vf_coef`` x the clipped value loss of ``values[b, T]`` on the kept positions, and its stats."""
    value = ops.value_loss(
        values[keep].float(),
        micro["old_values"][keep],
        micro["returns"][keep],
        ones,
        clip=config.value_clip or None,
    )
    stats = {"value/loss": value.loss.detach(), "value/clip_fraction": value.clip_fraction}
    return config.vf_coef * value.loss, stats


def ptx_batches(sequences, batch_size: int, seed: int, pad_token_id: int, device):
    """An endless stream of pretraining micro-batches, reshuffled each pass (seeded)."""
    for epoch in itertools.count():
        order = list(range(len(sequences)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size) or [0]:
            chunk = [sequences[i] for i in order[start : start + batch_size]]
            batch = send_to_device(pad_batch(chunk, pad_token_id), device)
            yield {"inputs": model_inputs(batch), "targets": batch["targets"]}
