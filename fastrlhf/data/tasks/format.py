"""A synthetic world where the preference is about format: one plain sentence, nothing around it.

The prompts are the instruction world's questions (``fastrlhf.data.synthetic``). Every demonstration
restates the question and gives the correct answer, but the labelers wrapped it in different ways: the
plain sentence ("3 plus 4 is 7."), an "Answer:" label, a lower-case start without a full stop, or
parentheses. ``gold_reward`` = ``0.6`` x correct + ``0.4`` x plain, where "plain" is an on-topic answer
(it restates the question) in the plain format: capitalised, one sentence, a full stop at the end, no
label and no brackets. So the ranked tiers score 1.0 (plain and correct), 0.6 (correct in another
format), 0.4 (plain but wrong) and 0.0 (wrong in another format).
"""

from __future__ import annotations

from fastrlhf.data import synthetic

WORLD = "format"
SAMPLE_SIZES = {"sft": 400, "rm": 400, "ppo": 200, "ptx": 200}
MAX_NEW_TOKENS = 24  # the longest demonstration is 17 tokens with its EOS

LABEL = "Answer: "
# The labelers' formats of one answer sentence, with their share of the demonstrations.
FORMATS = (
    ("plain", "{sentence}", 0.3),
    ("labelled", LABEL + "{sentence}", 0.25),
    ("lower", "{lower}", 0.25),
    ("bracketed", "({sentence})", 0.2),
)
_TEMPLATES = {name: template for name, template, _ in FORMATS}


def formatted(sentence: str, name: str) -> str:
    """``sentence`` ("3 plus 4 is 7.") in format ``name``."""
    lower = sentence[:1].lower() + sentence[1:].rstrip(".")
    return _TEMPLATES[name].format(sentence=sentence, lower=lower)


def _unwrapped(response: str) -> str:
    text = response.strip()
    text = text.removeprefix(LABEL.strip()).strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return text


def is_plain(response: str) -> bool:
    text = response.strip()
    return (
        synthetic.one_sentence(text)
        and text.endswith(".")
        and not text.startswith(("(", LABEL.strip()))
        and not text.endswith(")")
    )


def score(prompt: str, response: str) -> float:
    """The known preference of this world, in [0, 1] (see the module docstring)."""
    task = synthetic.lookup_task(prompt)
    body = _unwrapped(response)
    correct = 0.6 if synthetic.answers_correctly(task, body) else 0.0
    plain = 0.4 if is_plain(response) and synthetic.restates(task, body) else 0.0
    return round(correct + plain, 6)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """``score`` of each pair, in the ``--eval-reward-fn`` signature."""
    return [score(p, r) for p, r in zip(prompts, responses, strict=True)]


def sft_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT lines: the correct helpful sentence in a labeler's format."""
    rng = synthetic.world_rng(seed, "sft", WORLD)
    lines = []
    for task in synthetic.demonstrated_items(rng, n, synthetic.behaviour_pool()):
        response = formatted(task.helpful, synthetic.draw_style(rng, FORMATS))
        lines.append({"prompt": task.prompt, "response": response, "user": synthetic.draw_user(rng)})
    return lines


def response_tiers(task: synthetic.Task, rng) -> list[str]:
    """Responses to ``task``, best first by ``score``: correct and wrong answers, each plain and in another
    format, so that format and correctness vary independently (a reward model cannot learn one from the
    other)."""
    other = rng.choice([name for name, _, _ in FORMATS[1:]])
    wrong = task.sentence(rng.choice(task.wrong_answers))
    return [task.helpful, formatted(task.helpful, other), wrong, formatted(wrong, other)]


def ranked_examples(n: int, seed: int = 0) -> list[dict]:
    return synthetic.behaviour_ranked_examples(WORLD, response_tiers, n, seed)


def prompts(n: int, seed: int = 0) -> list[dict]:
    return synthetic.behaviour_prompts(WORLD, n, seed)


def pretraining_texts(n: int, seed: int = 0) -> list[dict]:
    return [{"text": text} for text in synthetic.world_rng(seed, "ptx", WORLD).sample(synthetic.facts(), n)]
