"""A synthetic world where the preference is about length: answer, then stop.

The prompts are the instruction world's questions (``fastrlhf.data.synthetic``). Most demonstrations pad
the helpful answer with one to three sentences of pleasantries ("I hope this helps."); the preference
wants the answer alone. ``gold_reward`` = ``0.5`` x the first sentence answers correctly + ``0.5`` x
brevity, where brevity counts only for an on-topic answer (one that restates the question) and falls with
every extra sentence: 1, 0.6, 0.3, then 0.1 for four sentences or more. So the ranked tiers score 1.0
(the answer alone), 0.8 and 0.65 (one or two extra sentences), 0.5, 0.3 and 0.15 (a wrong answer alone,
with one or two extra sentences) and 0.0 (off-topic).
"""

from __future__ import annotations

import re

from fastrlhf.data import synthetic

WORLD = "concise"
SAMPLE_SIZES = {"sft": 400, "rm": 400, "ppo": 200, "ptx": 200}
MAX_NEW_TOKENS = 40  # the longest padded demonstration is 35 tokens with its EOS

FILLERS = (
    "I hope this helps.",
    "Let me know if you have more questions.",
    "That was a good question.",
    "Thank you for asking.",
    "Have a nice day.",
)
BREVITY = (1.0, 0.6, 0.3, 0.1)  # by the number of sentences: 1, 2, 3, 4 or more
CONCISE_SHARE = 0.3  # of the demonstrations; the rest carry 1-3 filler sentences


def sentences(response: str) -> list[str]:
    return [part for part in re.split(r"(?<=[.!?])\s+", response.strip()) if part]


def score(prompt: str, response: str) -> float:
    """The known preference of this world, in [0, 1] (see the module docstring)."""
    task = synthetic.lookup_task(prompt)
    parts = sentences(response)
    if not parts:
        return 0.0
    first = parts[0]
    correct = 0.5 if synthetic.answers_correctly(task, first) else 0.0
    brevity = BREVITY[min(len(parts), len(BREVITY)) - 1] if synthetic.restates(task, first) else 0.0
    return round(correct + 0.5 * brevity, 6)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """``score`` of each pair, in the ``--eval-reward-fn`` signature."""
    return [score(p, r) for p, r in zip(prompts, responses, strict=True)]


def _padded(text: str, count: int, rng) -> str:
    return " ".join([text, *rng.sample(FILLERS, count)])


def sft_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT lines: the helpful answer, usually padded."""
    rng = synthetic.world_rng(seed, "sft", WORLD)
    lines = []
    for task in synthetic.demonstrated_items(rng, n, synthetic.behaviour_pool()):
        extra = 0 if rng.random() < CONCISE_SHARE else rng.randint(1, 3)
        response = _padded(task.helpful, extra, rng)
        lines.append({"prompt": task.prompt, "response": response, "user": synthetic.draw_user(rng)})
    return lines


def response_tiers(task: synthetic.Task, rng) -> list[str]:
    """Responses to ``task``, best first by ``score``: correct and wrong answers, each alone and padded with
    one or two sentences, and an off-topic line, so that length and correctness vary independently (a
    reward model cannot learn one from the other)."""
    wrong = task.sentence(rng.choice(task.wrong_answers))
    correct = [_padded(task.helpful, extra, rng) for extra in (0, 1, 2)]
    wrongs = [_padded(wrong, extra, rng) for extra in (0, 1, 2)]
    return correct + wrongs + [rng.choice(synthetic.OFF_TOPIC)]


def ranked_examples(n: int, seed: int = 0) -> list[dict]:
    return synthetic.behaviour_ranked_examples(WORLD, response_tiers, n, seed)


def prompts(n: int, seed: int = 0) -> list[dict]:
    return synthetic.behaviour_prompts(WORLD, n, seed)


def pretraining_texts(n: int, seed: int = 0) -> list[dict]:
    return [{"text": text} for text in synthetic.world_rng(seed, "ptx", WORLD).sample(synthetic.facts(), n)]
