"""Held-out evaluation of a policy: what the reward model and the ground truth say of its responses, and the
perplexity of held-out text and the policy's KL to the reference on it (the "alignment tax").

``evaluate_policy`` answers every held-out prompt greedily once and by sampling ``samples`` times at the
training temperature (the policy PPO optimises is the sampled one), from a fixed seed, so the evaluations
at the start and at the end of a run draw the same random numbers and their samples pair up for the win
rate. ``compare`` turns two evaluations into the start → end figures of a run's summary.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device

from fastrlhf.data.batching import IGNORE_INDEX, model_inputs, pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.models.eval_mode import evaluating
from fastrlhf.models.policy import target_logprobs
from fastrlhf.train.rewards import call_reward_fn
from fastrlhf.train.rollout import collect_rollout, seeded_sampling
from fastrlhf.train.sharding import gathered_for_generation
from fastrlhf.train.zero import zero3_gathered


@dataclasses.dataclass
class EvalSet:
    """What ``evaluate_policy`` reads: the held-out prompts and text, and who judges the responses."""

    prompt_ids: list[tuple[int, ...]]
    prompts: list[str]
    texts: list[TokenizedSequence]  # held-out text for the perplexity
    reward_model: object | None
    reward_fn: object | None
    gold_fn: object | None  # the ground truth, when known: measured, never trained on
    reward_fn_weight: float = 1.0


def evaluate_policy(
    model,
    tokenizer,
    data: EvalSet,
    *,
    temperature: float,
    samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    device,
    with_text_kl: bool = True,
) -> dict:
    """Scores of the policy's responses to the held-out prompts, and the held-out text's perplexity and KL.

    ``model`` is the unwrapped ``ActorCritic``. Returns plain lists and floats (JSON-able): per-response
    ``rm`` and ``gold`` scores of the ``greedy`` answers and of the ``sampled`` ones (``samples`` per
    prompt, prompt-major), their means, ``perplexity`` and ``text_kl`` (``text_kl_to_reference``;
    ``with_text_kl=False`` leaves it out).
    """
    result: dict = {"prompts": len(data.prompts), "samples_per_prompt": samples}
    if not data.prompts:
        return result | _text_figures(model, data, tokenizer, batch_size, device, with_text_kl)
    for kind, sampling_temperature, k in (("greedy", 0.0, 1), ("sampled", temperature, samples)):
        with seeded_sampling(seed), gathered_for_generation(model):
            rollout = collect_rollout(
                model.generation_model(),
                data.reward_model,
                data.reward_fn,
                tokenizer,
                data.prompt_ids,
                data.prompts,
                max_new_tokens=max_new_tokens,
                temperature=sampling_temperature,
                batch_size=batch_size,
                samples_per_prompt=k,
                reward_fn_weight=data.reward_fn_weight,
                device=device,
            )
        rm = rollout.scores.tolist()
        gold = call_reward_fn(data.gold_fn, rollout.prompts, rollout.responses) if data.gold_fn else None
        result[kind] = {
            "rm": rm,
            "rm_mean": statistics.fmean(rm),
            "gold": gold,
            "gold_mean": statistics.fmean(gold) if gold else None,
            "length_mean": float(rollout.response_lengths.float().mean()),
            "examples": [
                {"prompt": p, "response": r}
                for p, r in zip(rollout.prompts[:4], rollout.responses[:4], strict=True)
            ],
        }
    return result | _text_figures(model, data, tokenizer, batch_size, device, with_text_kl)


def compare(start: dict, end: dict) -> dict:
    """Start → end figures of two evaluations of the same held-out set.

    The win rate pairs sample ``j`` of each prompt at the end with sample ``j`` at the start (the same
    random numbers drew them) and counts a win as 1 and a tie as ½; the judge is the ground truth when
    it is known, else the reward model.
    """
    out = {"eval_perplexity_start": start.get("perplexity"), "eval_perplexity_end": end.get("perplexity")}
    out |= {"eval_text_kl_start": start.get("text_kl"), "eval_text_kl_end": end.get("text_kl")}
    for kind in ("greedy", "sampled"):
        if kind not in start or kind not in end:
            continue
        a, b = start[kind], end[kind]
        judge = "gold" if a["gold"] is not None else "rm"
        wins = [1.0 if y > x else 0.5 if y == x else 0.0 for x, y in zip(a[judge], b[judge], strict=True)]
        out.update(
            {
                f"eval_{kind}_rm_start": a["rm_mean"],
                f"eval_{kind}_rm_end": b["rm_mean"],
                f"eval_{kind}_gold_start": a["gold_mean"],
                f"eval_{kind}_gold_end": b["gold_mean"],
                f"eval_{kind}_length_start": a["length_mean"],
                f"eval_{kind}_length_end": b["length_mean"],
                f"eval_{kind}_win_rate": statistics.fmean(wins),
                f"eval_{kind}_judge": judge,
            }
        )
    return out


def _padded_batches(sequences: list[TokenizedSequence], pad_token_id: int, batch_size: int, device):
    """``sequences`` as padded batches of ``batch_size`` on ``device``, one at a time."""
    for start in range(0, len(sequences), batch_size):
        yield send_to_device(pad_batch(sequences[start : start + batch_size], pad_token_id), device)


@torch.no_grad()
def text_perplexity(
    model, sequences: list[TokenizedSequence], pad_token_id: int, batch_size: int, device
) -> float:
    """exp(mean NLL per token) of ``sequences`` under the policy (eval mode, temperature 1)."""
    total, count = 0.0, 0
    with evaluating(model):
        for batch in _padded_batches(sequences, pad_token_id, batch_size, device):
            head_fn = target_logprobs(batch["targets"])
            logprobs, _ = model(value_rows=0, head_fn=head_fn, **model_inputs(batch))
            total -= float(logprobs.double().sum())
            count += logprobs.numel()
    return math.exp(total / count) if count else float("nan")


# Rows of [rows, V] log-softmax held at once by ``text_kl_to_reference``: two float32 blocks of
# 256 x 152k (Qwen's vocabulary) are 300 MB, whatever the text's length.
KL_ROWS_PER_BLOCK = 256


@torch.no_grad()
def text_kl_to_reference(
    model, sequences: list[TokenizedSequence], pad_token_id: int, batch_size: int, device
) -> float:
    """Mean over the text's predicted tokens of KL(reference || policy) over the whole vocabulary, in nats.

    The alignment tax as drift: how far the policy's next-token distribution on ``sequences`` moved from
    the frozen reference's (the SFT policy; ``ActorCritic.reference_hidden``). Unlike the perplexity
    rise, it is never negative and does not cancel out: a policy that got better on some lines and worse
    on others has moved. Temperature 1, eval mode; 0 for a policy equal to its reference.
    """
    total, count = 0.0, 0
    with evaluating(model):
        for batch in _padded_batches(sequences, pad_token_id, batch_size, device):
            selected = batch["targets"] != IGNORE_INDEX
            reference_hidden, reference_head = model.reference_hidden(**model_inputs(batch))
            kl_sum = _kl_sum_head(reference_hidden[selected], reference_head, selected)
            batch_kl, _ = model(value_rows=0, head_fn=kl_sum, **model_inputs(batch))
            total += batch_kl
            count += int(selected.sum())
    return total / count if count else float("nan")


def _kl_sum_head(reference_hidden: torch.Tensor, reference_head: torch.nn.Linear, selected: torch.Tensor):
    """``head_fn(hidden[B, T, H], lm_head) -> float``: Σ over the ``selected`` positions of KL(reference ||
    policy), from the reference's hidden states there (``[n, H]``), in blocks of ``KL_ROWS_PER_BLOCK`` rows.
    It runs inside the policy's forward because ZeRO-3 holds the lm_head whole only there."""

    def kl_sum(hidden: torch.Tensor, head: torch.nn.Linear) -> float:
        hidden, total = hidden[selected], 0.0
        for rows in torch.split(torch.arange(hidden.shape[0], device=hidden.device), KL_ROWS_PER_BLOCK):
            policy = F.linear(hidden[rows], head.weight, head.bias).float().log_softmax(-1)
            reference = F.linear(reference_hidden[rows], reference_head.weight, reference_head.bias)
            total += float(
                F.kl_div(policy, reference.float().log_softmax(-1), log_target=True, reduction="sum")
            )
        return total

    return kl_sum


def _text_figures(model, data: EvalSet, tokenizer, batch_size: int, device, with_text_kl: bool) -> dict:
    """``perplexity`` and (``with_text_kl``) ``text_kl`` of the held-out text (NaN without one)."""
    if not data.texts:
        return {"perplexity": float("nan")} | ({"text_kl": float("nan")} if with_text_kl else {})
    pad = tokenizer.pad_token_id
    figures = {"perplexity": text_perplexity(model, data.texts, pad, batch_size, device)}
    if with_text_kl:
        with zero3_gathered(model):  # the KL reads both lm_heads directly, as the experience passes do
            figures["text_kl"] = text_kl_to_reference(model, data.texts, pad, batch_size, device)
    return figures
