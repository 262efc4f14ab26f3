"""PPO's pieces between the prompts and the gradient: rollout, scoring, experience, and one micro-batch's
backward pass (with PPO-ptx). ``ppo.py`` strings them together; every formula is a ``fastrlhf.ops`` call.

Layout: a rollout is a right-padded ``[B, T]`` batch of prompt + response sequences with
next-token-aligned ``targets`` (``fastrlhf.data.batching``); ``mask = targets != -100`` marks the
positions that predict a response token. Log-probs, values, advantages and returns are ``[B, T]`` on that
layout, 0 elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from accelerate.utils import send_to_device

from fastrlhf import ops
from fastrlhf.data.batching import IGNORE_INDEX, model_inputs, pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.inference.generate import generate_responses
from fastrlhf.train.rewards import call_reward_fn


@dataclasses.dataclass
class Rollout:
    """One batch of sampled responses, scored. Tensors are ``[B, T]`` unless noted."""

    batch: dict  # pad_batch output: input_ids, attention_mask, position_ids, targets, ...
    mask: torch.Tensor  # bool, the response-predicting positions
    scores: torch.Tensor  # [B] float32: reward model (bias applied) + rule reward - EOS penalty
    ended_with_eos: torch.Tensor  # [B] bool
    response_lengths: torch.Tensor  # [B] tokens, EOS included
    prompts: list[str]
    responses: list[str]
    generation_seconds: float


def collect_rollout(
    policy_lm,
    reward_model,
    reward_fn,
    tokenizer,
    prompt_ids: list[tuple[int, ...]],
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    reward_fn_weight: float = 1.0,
    missing_eos_penalty: float | None = None,
    device=None,
) -> Rollout:
    """Sample one response per prompt with ``policy_lm`` (eval mode), then score it."""
    start = time.perf_counter()
    generated = generate_responses(
        policy_lm,
        prompt_ids,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
    )
    generation_seconds = time.perf_counter() - start
    sequences = [TokenizedSequence(g.prompt_ids + g.response_ids, len(g.prompt_ids)) for g in generated]
    batch = send_to_device(pad_batch(sequences, tokenizer.pad_token_id, "right"), device)
    responses = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generated]
    ended = torch.tensor([g.ended_with_eos for g in generated], device=device)
    scores = score_rollout(reward_model, reward_fn, batch, prompts, responses, reward_fn_weight)
    if missing_eos_penalty is not None:
        # The "EOS trick": a response cut off by max_new_tokens is worth less than one that finished.
        scores = scores - missing_eos_penalty * (~ended).float()
    lengths = torch.tensor([len(g.response_ids) for g in generated], device=device)
    return Rollout(
        batch,
        batch["targets"] != IGNORE_INDEX,
        scores,
        ended,
        lengths,
        list(prompts),
        responses,
        generation_seconds,
    )


@torch.no_grad()
def score_rollout(
    reward_model, reward_fn, batch: dict, prompts, responses, reward_fn_weight: float
) -> torch.Tensor:
    """``[B]`` float32: the reward model's score at each sequence's last token, plus the rule reward."""
    device = batch["input_ids"].device
    scores = torch.zeros(batch["input_ids"].shape[0], device=device)
    if reward_model is not None:
        scores += reward_model(**model_inputs(batch)).float()
    if reward_fn is not None:
        scores += reward_fn_weight * torch.tensor(
            call_reward_fn(reward_fn, prompts, responses), device=device
        )
    return scores


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split a row order into consecutive blocks of ``size`` rows (the last may be smaller)."""
    return [rows[i : i + size] for i in range(0, rows.numel(), size)]


def select_rows(rollout: Rollout, rows: torch.Tensor) -> dict:
    """The model inputs and targets of ``rows`` of a rollout, at the rollout's full width ``T``.

    Keeping the width fixed means the experience pass and the first update epoch run the model on
    identical tensors, which is what makes the first epoch's ratio exactly 1.
    """
    batch = {k: v[rows] for k, v in rollout.batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
    return {"inputs": model_inputs(batch), "targets": batch["targets"], "mask": rollout.mask[rows]}


@torch.no_grad()
def compute_experience(model, rollout: Rollout, micro_batch_rows: int) -> dict:
    """Old log-probs, reference log-probs and values ``[B, T]`` (eval mode: no dropout).

    The passes run in the same row blocks as the first update epoch (see ``select_rows``).
    """
    shape = rollout.mask.shape
    device = rollout.mask.device
    old_logprobs, ref_logprobs, values = (torch.zeros(shape, device=device) for _ in range(3))
    was_training = model.training
    model.eval()
    try:
        for rows in micro_batches(torch.arange(shape[0], device=device), micro_batch_rows):
            micro = select_rows(rollout, rows)
            keep, targets = micro["mask"], micro["targets"]
            hidden, value = model(**micro["inputs"])
            head = model.lm_head
            block = torch.zeros(rows.numel(), shape[1], device=device)
            block[keep] = ops.linear_logprobs(hidden[keep], head.weight, targets[keep], bias=head.bias)
            old_logprobs[rows] = block
            ref_hidden, ref_head = model.reference_hidden(**micro["inputs"])
            block = torch.zeros(rows.numel(), shape[1], device=device)
            block[keep] = ops.linear_logprobs(
                ref_hidden[keep], ref_head.weight, targets[keep], bias=ref_head.bias
            )
            ref_logprobs[rows] = block
            values[rows] = torch.where(keep, value.float(), 0.0)
    finally:
        model.train(was_training)
    return {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "values": values}


def backward_micro_batch(
    model,
    accelerator,
    micro: dict,
    ptx: dict | None,
    *,
    clip_eps: float,
    value_clip: float | None,
    vf_coef: float,
    entropy_coef: float,
    ptx_coef: float,
    sync: bool,
) -> dict:
    """Forward and backward of one micro-batch: PPO's clipped policy loss + ``vf_coef`` x the clipped value
    loss, then (PPO-ptx) ``ptx_coef`` x the LM loss on pretraining text, accumulated into the same
    gradient buffers before the caller's one optimizer step.

    ``micro``: ``select_rows`` output plus ``old_logprobs``, ``advantages``, ``old_values``, ``returns``
    ``[b, T]``. ``ptx``: ``{"inputs", "targets"}`` of a pretraining batch, or None. ``sync``: whether this
    micro-batch's last backward all-reduces the gradients (under DDP). Returns detached stats.
    """
    head = accelerator.unwrap_model(model).lm_head
    keep = micro["mask"]
    ones = torch.ones(int(keep.sum()), dtype=torch.bool, device=keep.device)
    # Under DDP only the micro-batch's last backward may all-reduce; no_sync is a no-op otherwise.
    ppo_sync = contextlib.nullcontext() if sync and ptx is None else accelerator.no_sync(model)
    with ppo_sync:
        hidden, values = model(**micro["inputs"])
        policy = ops.linear_ppo_policy_loss(
            hidden[keep],
            head.weight,
            micro["targets"][keep],
            micro["old_logprobs"][keep],
            micro["advantages"][keep],
            ones,
            bias=head.bias,
            clip_eps=clip_eps,
            entropy_coef=entropy_coef,
            compute_entropy=True,
        )
        value = ops.value_loss(
            values[keep].float(), micro["old_values"][keep], micro["returns"][keep], ones, clip=value_clip
        )
        accelerator.backward(policy.loss + vf_coef * value.loss)
    stats = {
        "policy/loss": policy.loss.detach(),
        "policy/clip_fraction": policy.clip_fraction,
        "policy/approx_kl": policy.approx_kl,
        "policy/entropy": policy.entropy,
        "value/loss": value.loss.detach(),
        "value/clip_fraction": value.clip_fraction,
    }
    if ptx is not None:
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            hidden, values = model(**ptx["inputs"])
            selected = ptx["targets"] != IGNORE_INDEX
            lm_logprobs = ops.linear_logprobs(
                hidden[selected], head.weight, ptx["targets"][selected], bias=head.bias
            )
            ptx_loss = -lm_logprobs.mean()
            # 0 x values keeps the critic's parameters in this backward's graph, which DDP requires of
            # every parameter in a synchronising backward; it adds exactly nothing to the gradients.
            accelerator.backward(ptx_coef * ptx_loss + 0.0 * values.float().sum())
        stats["ptx/loss"] = ptx_loss.detach()
    return stats


@torch.no_grad()
def text_perplexity(
    model, sequences: list[TokenizedSequence], pad_token_id: int, batch_size: int, device
) -> float:
    """exp(mean NLL per token) of ``sequences`` under the policy (eval mode)."""
    import math

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            batch = send_to_device(pad_batch(sequences[start : start + batch_size], pad_token_id), device)
            hidden, _ = model(value_rows=0, **model_inputs(batch))
            keep = batch["targets"] != IGNORE_INDEX
            head = model.lm_head
            logprobs = ops.linear_logprobs(hidden[keep], head.weight, batch["targets"][keep], bias=head.bias)
            total -= float(logprobs.double().sum())
            count += logprobs.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count) if count else float("nan")
