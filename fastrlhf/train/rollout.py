"""Rollout: sample responses to a batch of prompts with the policy, cut them at EOS, and score them.

Layout: a rollout is a right-padded ``[B, T]`` batch of prompt + response sequences with
next-token-aligned ``targets`` (``fastrlhf.data.batching``); ``mask = targets != -100`` marks the
positions that predict a response token. Rows are prompt-major: the ``k`` samples of prompt ``i`` are rows
``i*k .. i*k + k-1``, which is the ``[B/k, k]`` group layout ``ops.group_advantages`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from accelerate.utils import send_to_device

from fastrlhf.data.batching import IGNORE_INDEX, model_inputs, pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.errors import InputError
from fastrlhf.inference.generate import generate_responses
from fastrlhf.train.rewards import call_reward_fn


@dataclasses.dataclass
class Rollout:
    """One batch of sampled responses, scored. Tensors are ``[B, T]`` unless noted."""

    batch: dict  # pad_batch output: input_ids, attention_mask, position_ids, targets, ...
    mask: torch.Tensor  # bool, the response-predicting positions
    scores: torch.Tensor  # [B] float32: reward model (bias applied) + weight x rule reward
    ended_with_eos: torch.Tensor  # [B] bool
    response_lengths: torch.Tensor  # [B] tokens, EOS included
    prompts: list[str]  # [B], each prompt repeated once per sample
    responses: list[str]  # [B]
    samples_per_prompt: int
    generation_seconds: float
    # [n] float32, n = mask.sum(), row-major like x[mask]: each response token's log-probability as the
    # sampler computed it (cached decoding); None for greedy rollouts.
    sampled_logprobs: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


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
    batch_size: int,
    samples_per_prompt: int = 1,
    reward_fn_weight: float = 1.0,
    device=None,
    sampler: str = "fastrlhf",
) -> Rollout:
    """Sample ``samples_per_prompt`` responses per prompt with ``policy_lm`` (eval mode) from the full
    softmax at ``temperature`` (0: greedy) with ``sampler`` (see ``generate_responses``), then score them."""
    start = time.perf_counter()
    k = samples_per_prompt
    generated = generate_responses(
        policy_lm,
        [ids for ids in prompt_ids for _ in range(k)],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size * k,
        return_logprobs=temperature > 0,
        sampler=sampler,
    )
    generation_seconds = time.perf_counter() - start
    prompts = [p for p in prompts for _ in range(k)]
    sequences = [TokenizedSequence(g.prompt_ids + g.response_ids, len(g.prompt_ids)) for g in generated]
    batch = send_to_device(pad_batch(sequences, tokenizer.pad_token_id, "right"), device)
    responses = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generated]
    ended = torch.tensor([g.ended_with_eos for g in generated], device=device)
    scores = score_rollout(reward_model, reward_fn, batch, prompts, responses, reward_fn_weight)
    lengths = torch.tensor([len(g.response_ids) for g in generated], device=device)
    sampled = None
    if temperature > 0:
        sampled = torch.tensor([x for g in generated for x in g.logprobs], dtype=torch.float32, device=device)
    return Rollout(
        batch,
        batch["targets"] != IGNORE_INDEX,
        scores,
        ended,
        lengths,
        prompts,
        responses,
        k,
        generation_seconds,
        sampled,
    )


@torch.no_grad()
def score_rollout(
    reward_model, reward_fn, batch: dict, prompts, responses, reward_fn_weight: float
) -> torch.Tensor:
    """``[B]`` float32: the reward model's score at each sequence's last token, plus the rule reward.

    A non-finite score is an error naming the prompt and response: normalised into the returns, one NaN
    would turn every advantage of the rollout into NaN."""
    device = batch["input_ids"].device
    scores = torch.zeros(batch["input_ids"].shape[0], device=device)
    if reward_model is not None:
        model_scores = reward_model(**model_inputs(batch)).float()
        _check_finite_scores(model_scores, "the reward model", prompts, responses)
        scores += model_scores
    if reward_fn is not None:
        scores += reward_fn_weight * torch.tensor(
            call_reward_fn(reward_fn, prompts, responses), device=device
        )
        _check_finite_scores(scores, "the weighted rule reward", prompts, responses)
    return scores


def _check_finite_scores(scores: torch.Tensor, source: str, prompts, responses) -> None:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        row = bad[0]
        raise InputError(
            f"{source} gave a non-finite score ({float(scores[row])}) to {len(bad)} of {scores.numel()} "
            f"responses, first to prompt {prompts[row]!r} with response {responses[row][:200]!r}"
        )


@contextlib.contextmanager
def seeded_sampling(seed: int):
    """Sampling inside the block draws from ``seed`` and leaves the caller's RNG streams untouched.

    Evaluation uses it so that its samples neither depend on nor disturb the training run's RNG (a resumed
    run samples exactly what the uninterrupted one did), and so that the start and end evaluations draw
    the same random numbers, which pairs their samples for the win rate.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


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
