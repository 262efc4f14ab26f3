"""Comparison data the InstructGPT way: sample K responses per prompt from a policy (the SFT model) and rank
them with a labeler, into the reward model's ranked format.

InstructGPT's labelers ranked the outputs of its own models, so the reward model learned to tell apart
exactly the responses PPO would produce. A reward model trained only on hand-written tiers has never seen
the policy's own mistakes (a fluent answer about the wrong subject, say) and rewards them; PPO then drifts
into them. Here the labeler is a function ``labeler(prompts, responses) -> list[float]`` (higher is
better): a rule, a judge model, or, for the synthetic worlds, the world's known preference standing in
for human labelers.

One output line per prompt whose samples the labeler does not score all alike: the distinct responses
(at most ``MAX_RESPONSES``), ranked by score with ties sharing a rank (the ranking loss skips tied pairs).
"""

from __future__ import annotations

import dataclasses

from fastrlhf.data.readers import MAX_RESPONSES
from fastrlhf.errors import InputError
from fastrlhf.inference.generate import generate_responses
from fastrlhf.train.rewards import call_reward_fn


@dataclasses.dataclass
class LabelReport:
    prompts: int  # prompts sampled
    lines: int  # lines written: prompts whose samples the labeler told apart
    responses: int  # distinct responses written
    pairs: int  # ranked pairs (ties excluded)


def label_comparisons(
    lm,
    tokenizer,
    prompt_ids: list[tuple[int, ...]],
    prompts: list[str],
    labeler,
    *,
    users: list[str | None] | None = None,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
) -> tuple[list[dict], LabelReport]:
    """``(lines, report)``: ranked-format lines ``{"prompt", "responses": [{"text", "ranking"}], "user"?}``.

    Samples ``samples_per_prompt`` responses per prompt from ``lm`` at ``temperature`` (the caller seeds
    torch's RNG), scores each with ``labeler`` and ranks the distinct ones: rank 1 is the best score.
    """
    if samples_per_prompt < 2:
        raise InputError(f"samples_per_prompt must be >= 2 to compare responses, got {samples_per_prompt}")
    k = samples_per_prompt
    generated = generate_responses(
        lm,
        [ids for ids in prompt_ids for _ in range(k)],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
    )
    texts = [tokenizer.decode(g.response_ids, skip_special_tokens=True).strip() for g in generated]
    scores = call_reward_fn(labeler, [p for p in prompts for _ in range(k)], texts)
    lines, responses, pairs = [], 0, 0
    for i, prompt in enumerate(prompts):
        distinct: dict[str, float] = {}
        for text, score in zip(texts[i * k : (i + 1) * k], scores[i * k : (i + 1) * k], strict=True):
            if text:
                distinct.setdefault(text, score)
        ranked = sorted(distinct.items(), key=lambda item: -item[1])[:MAX_RESPONSES]
        levels = sorted({score for _, score in ranked}, reverse=True)
        if len(levels) < 2:
            continue  # nothing to learn from responses the labeler scores alike
        line = {
            "prompt": prompt,
            "responses": [{"text": text, "ranking": levels.index(score) + 1} for text, score in ranked],
        }
        if users is not None and users[i] is not None:
            line["user"] = users[i]
        lines.append(line)
        responses += len(ranked)
        ranks = [levels.index(score) for _, score in ranked]
        pairs += sum(a != b for j, a in enumerate(ranks) for b in ranks[j + 1 :])
    return lines, LabelReport(len(prompts), len(lines), responses, pairs)
