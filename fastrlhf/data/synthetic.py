"""A small synthetic instruction-following world with a known preference, and the bundled sample data.

Every prompt has one correct answer that a rule computes (add two numbers, the day after Monday, the
colour of a banana, ...), so the three InstructGPT stages have something a ~1M-parameter model can
visibly learn on a CPU in minutes:

- SFT demonstrations answer in one helpful style: a full sentence that restates the question and ends
  with the answer ("3 plus 4 is 7.").
- Ranked responses follow a known preference, best first: that helpful sentence, the bare answer
  ("7"), a wrong answer in the helpful style ("3 plus 4 is 8."), an off-topic line or a refusal.
- ``preference_score`` encodes the same preference as a rule, usable as a reward: the "content" task of
  the alignment benchmark, where only a correct answer scores high.

This module also holds what the other synthetic worlds (``fastrlhf.data.tasks``) build on: the draws of
prompts and users, seeded per world and file, and the ranked-line layout. The bundled sample data under
``fastrlhf/data/sample/`` is the ``refusal`` world (``fastrlhf.data.tasks.refusal``): these questions
mixed with harmful requests, demonstrated by inconsistent labelers.

Everything is drawn from a seeded ``random.Random``: the same seed gives byte-identical files.
``python -m fastrlhf.data.synthetic`` rewrites the bundled files.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import re

from fastrlhf.errors import InputError

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")
SAMPLE_SIZES = {"sft": 400, "rm": 400, "ppo": 200, "ptx": 200}
MAX_NEW_TOKENS = 24  # the longest demonstration is 16 tokens with its EOS

NUM_USERS = 30
# Zipf-like weights: user 1 writes ~8x as much as user 30, so per-user caps and user splits matter.
USER_WEIGHTS = tuple(1.0 / (rank + 2) ** 0.8 for rank in range(NUM_USERS))
USERS = tuple(f"user-{i:02d}" for i in range(1, NUM_USERS + 1))

# Score parts of ``preference_score``: correctness dominates, then restating the question, then form.
CORRECT_SCORE, ON_TOPIC_SCORE, SENTENCE_SCORE = 0.6, 0.3, 0.1

# Rank 4 of the ranked data: answers nothing about the question.
OFF_TOPIC = (
    "Sorry, I can not help with that.",
    "I would rather not answer.",
    "Let us talk about something else.",
    "I do not know.",
    "Please ask me another question.",
    "The weather is nice today.",
    "I like to sing songs.",
    "That is not a good question.",
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One prompt of the world. The helpful answer is ``lead + answer + "."``; a wrong answer swaps
    ``answer`` for one of ``wrong_answers``; ``subject`` is what a helpful answer restates."""

    family: str
    prompt: str
    answer: str
    lead: str
    subject: str
    wrong_answers: tuple[str, ...]

    @property
    def helpful(self) -> str:
        return self.sentence(self.answer)

    def sentence(self, answer: str) -> str:
        """``answer`` (the correct one, or a wrong one) in the helpful style."""
        return f"{self.lead}{answer}."


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
COLOURED = (  # (noun phrase, subject, colour)
    ("a banana", "banana", "yellow"),
    ("a lemon", "lemon", "yellow"),
    ("grass", "grass", "green"),
    ("a leaf", "leaf", "green"),
    ("a frog", "frog", "green"),
    ("a lime", "lime", "green"),
    ("the sky", "sky", "blue"),
    ("the sea", "sea", "blue"),
    ("snow", "snow", "white"),
    ("milk", "milk", "white"),
    ("a cloud", "cloud", "white"),
    ("salt", "salt", "white"),
    ("coal", "coal", "black"),
    ("a crow", "crow", "black"),
    ("a tomato", "tomato", "red"),
    ("a strawberry", "strawberry", "red"),
    ("a cherry", "cherry", "red"),
    ("a carrot", "carrot", "orange"),
    ("a pumpkin", "pumpkin", "orange"),
    ("a plum", "plum", "purple"),
    ("a grape", "grape", "purple"),
    ("chocolate", "chocolate", "brown"),
    ("coffee", "coffee", "brown"),
    ("a flamingo", "flamingo", "pink"),
    ("a pig", "pig", "pink"),
)
COLOURS = tuple(sorted({colour for _, _, colour in COLOURED}))
OPPOSITE_PAIRS = (
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("day", "night"),
    ("happy", "sad"),
    ("light", "dark"),
    ("wet", "dry"),
    ("full", "empty"),
    ("hard", "soft"),
    ("early", "late"),
    ("loud", "quiet"),
    ("left", "right"),
    ("thick", "thin"),
    ("rich", "poor"),
    ("clean", "dirty"),
    ("near", "far"),
    ("first", "last"),
    ("win", "lose"),
    ("push", "pull"),
    ("buy", "sell"),
    ("always", "never"),
    ("true", "false"),
    ("open", "closed"),
    ("young", "old"),
    ("strong", "weak"),
    ("good", "bad"),
)
ADJECTIVES = ("red", "big", "small", "happy", "old", "blue", "green", "little", "quick", "lazy")
NOUNS = ("fox", "dog", "cat", "house", "tree", "boat", "bird", "hat", "cup", "car")
REPEAT_WORDS = (
    "hello",
    "yes",
    "go",
    "cat",
    "dog",
    "hi",
    "la",
    "moo",
    "stop",
    "run",
    "jump",
    "ha",
    "boom",
    "ding",
    "beep",
    "tick",
    "wow",
    "hop",
    "zoom",
    "quack",
)
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SPELL_WORDS = (
    "cat",
    "dog",
    "sun",
    "hat",
    "cup",
    "pen",
    "book",
    "fish",
    "bird",
    "tree",
    "milk",
    "frog",
    "ship",
    "lamp",
    "door",
    "rain",
    "star",
    "moon",
    "cake",
    "ball",
    "duck",
    "king",
    "rose",
    "bell",
    "kite",
    "nest",
    "ring",
    "shoe",
    "sock",
    "wolf",
    "goat",
    "leaf",
    "coin",
    "drum",
    "fork",
    "desk",
    "road",
    "hill",
    "lake",
    "seed",
)
ADD_MAX = 12  # operands 0..12: sums stay within a couple of tokens
NUMBER_MAX = 98  # "what comes after n" for n in 0..98


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _others(options, *exclude) -> tuple[str, ...]:
    return tuple(option for option in options if option not in exclude)


def _tasks(family: str, phrasings: tuple[str, ...], answer, lead, subject, wrong, **params) -> list[Task]:
    """One Task per phrasing of the same question (the answer does not depend on the phrasing)."""
    return [
        Task(family, phrasing.format(**params), answer, lead, subject, tuple(wrong)) for phrasing in phrasings
    ]


def _add() -> list[Task]:
    out = []
    for a in range(ADD_MAX + 1):
        for b in range(ADD_MAX + 1):
            total = a + b
            wrong = [str(total + d) for d in (-2, -1, 1, 2) if total + d >= 0]
            phrasings = ("What is {a} plus {b}?", "Add {a} and {b}.")
            out += _tasks("add", phrasings, str(total), f"{a} plus {b} is ", f"{a} plus {b}", wrong, a=a, b=b)
    return out


def _successor(family: str, noun: str, items: tuple[str, ...], cyclic: bool) -> list[Task]:
    out = []
    count = len(items) if cyclic else len(items) - 1
    for i in range(count):
        item, answer = items[i], items[(i + 1) % len(items)]
        phrasings = (f"What {noun} comes after {{item}}?", f"Which {noun} follows {{item}}?")
        # Wrong answers stay near the truth (the item itself, the one before, the one after next).
        near = {items[(i + d) % len(items)] for d in (-1, 0, 2) if cyclic or 0 <= i + d < len(items)}
        wrong = sorted(_others(near, answer), key=items.index)
        lead, subject = f"The {noun} after {item} is ", f"after {item}"
        out += _tasks(family, phrasings, answer, lead, subject, wrong, item=item)
    return out


def _colour() -> list[Task]:
    out = []
    for phrase, subject, colour in COLOURED:
        phrasings = ("What colour is {phrase}?", "Name the colour of {phrase}.")
        lead = f"{_capitalise(phrase)} is "
        out += _tasks("colour", phrasings, colour, lead, subject, _others(COLOURS, colour), phrase=phrase)
    return out


def _opposite() -> list[Task]:
    opposite = {a: b for a, b in OPPOSITE_PAIRS} | {b: a for a, b in OPPOSITE_PAIRS}
    out = []
    for word in sorted(opposite):
        answer = opposite[word]
        wrong = (word,) + tuple(sorted(set(_others(opposite.values(), answer, word))))
        phrasings = ("What is the opposite of {word}?", "Name the opposite of {word}.")
        lead, subject = f"The opposite of {word} is ", f"opposite of {word}"
        out += _tasks("opposite", phrasings, answer, lead, subject, wrong, word=word)
    return out


def _uppercase() -> list[Task]:
    out = []
    for adjective in ADJECTIVES:
        for noun in NOUNS:
            phrase = f"{adjective} {noun}"
            wrong = (phrase, phrase.title(), f"{adjective.upper()} {noun}")
            phrasings = ("Write {phrase} in capitals.", "Write {phrase} in capital letters.")
            lead = f"{_capitalise(phrase)} in capitals is "
            out += _tasks("uppercase", phrasings, phrase.upper(), lead, phrase, wrong, phrase=phrase)
    return out


def _repeat() -> list[Task]:
    out = []
    for word in REPEAT_WORDS:
        for count, count_word in COUNT_WORDS.items():
            # Too few repetitions only: one too many would still end with the right answer.
            wrong = [" ".join([word] * (count - 1))]
            phrasings = ("Say {word} {times} times.", "Repeat {word} {times} times.")
            lead, subject = f"Here is {word} {count_word} times: ", f"{word} {count_word} times"
            answer = " ".join([word] * count)
            out += _tasks("repeat", phrasings, answer, lead, subject, wrong, word=word, times=count_word)
    return out


def _spell() -> list[Task]:
    out = []
    for word in SPELL_WORDS:
        letters = list(word)
        wrong = []
        for i in range(len(letters) - 1):  # every spelling with two neighbouring letters swapped
            swapped = letters[:i] + [letters[i + 1], letters[i]] + letters[i + 2 :]
            if swapped != letters:
                wrong.append("-".join(swapped))
        phrasings = ("How do you spell {word}?", "Spell the word {word}.")
        lead = f"The spelling of {word} is "
        out += _tasks("spell", phrasings, "-".join(letters), lead, word, wrong, word=word)
    return out


@functools.lru_cache(maxsize=1)
def families() -> dict[str, tuple[Task, ...]]:
    """Every task of the world by family, in a fixed order."""
    tasks = (
        _add()
        + _successor("next_number", "number", tuple(str(n) for n in range(NUMBER_MAX + 2)), cyclic=False)
        + _successor("next_day", "day", DAYS, cyclic=True)
        + _successor("next_month", "month", MONTHS, cyclic=True)
        + _colour()
        + _opposite()
        + _uppercase()
        + _repeat()
        + _spell()
    )
    grouped: dict[str, list[Task]] = {}
    for task in tasks:
        grouped.setdefault(task.family, []).append(task)
    return {family: tuple(group) for family, group in grouped.items()}


# The families whose answers the tiny model learns reliably (small closed sets, or a rule it generalises:
# capitals). The worlds whose preference is about behaviour (refusal, concise, format) ask only these, so
# that what separates good from bad responses there is the behaviour, not arithmetic the reward model
# cannot check. The content world keeps every family.
BEHAVIOUR_FAMILIES = ("next_day", "next_month", "colour", "uppercase")


def behaviour_pool() -> dict[str, tuple[Task, ...]]:
    return {family: families()[family] for family in BEHAVIOUR_FAMILIES}


def normalise(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip()


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, Task]:
    index = {}
    for group in families().values():
        for task in group:
            key = normalise(task.prompt)
            if key in index:  # the world is broken if two questions read the same
                raise AssertionError(f"prompt {task.prompt!r} is defined twice")
            index[key] = task
    return index


def lookup_task(prompt: str) -> Task:
    """The task behind ``prompt`` (whitespace-insensitive). Raises ``ValueError`` for a prompt that is not
    part of this world."""
    task = _index().get(normalise(prompt))
    if task is None:
        raise InputError(
            f"prompt {prompt!r} is not a prompt of the synthetic world (fastrlhf.data.synthetic)"
        )
    return task


def answers_correctly(task: Task, response: str) -> bool:
    # The answer must close the response, and be the whole of it or follow "is " / ": ". That rejects
    # "3 plus 4 is 17" for 7 and one repetition too many ("hi hi hi" ends with "hi hi").
    final = response.strip()
    final = final[:-1] if final.endswith((".", "!")) else final
    return final == task.answer or final.endswith((f" is {task.answer}", f": {task.answer}"))


def restates(task: Task, response: str) -> bool:
    # Only the text before the answer counts, so the bare answer "RED FOX" does not restate "red fox".
    body = response.strip().rstrip(".!")
    if answers_correctly(task, response):
        body = body[: len(body) - len(task.answer)]
    return re.search(rf"(?<!\w){re.escape(task.subject)}(?!\w)", body, flags=re.IGNORECASE) is not None


def one_sentence(response: str) -> bool:
    text = response.strip()
    return (
        len(text) > 1
        and (text[0].isupper() or text[0].isdigit())
        and text[-1] in ".!"
        and not re.search(r"[.!?]\s", text)  # a second sentence is padding, not help
    )


def preference_score(prompt: str, response: str) -> float:
    """The world's known preference as a reward in [0, 1]: 0.6 for the correct answer, 0.3 for restating
    the question, 0.1 for answering in one full sentence. The ranked data's tiers score 1.0 (helpful
    sentence), 0.6 (bare answer), 0.4 (wrong answer in the helpful style), <= 0.1 (off-topic, refusal).
    Raises ``ValueError`` when ``prompt`` is not a prompt of the world."""
    task = lookup_task(prompt)
    score = CORRECT_SCORE if answers_correctly(task, response) else 0.0
    score += ON_TOPIC_SCORE if restates(task, response) else 0.0
    score += SENTENCE_SCORE if one_sentence(response) else 0.0
    return round(score, 6)


def draw_tasks(rng: random.Random, n: int, pool: dict[str, tuple] | None = None) -> list:
    """``n`` items of ``pool`` (by default the world's tasks by family): a family uniformly at random,
    then one of its items not drawn yet (a family whose items are used up drops out; when all are, every
    item becomes available again)."""
    groups = families() if pool is None else pool
    """``n`` tasks: a family uniformly at random, then one of its prompts not drawn yet (a family whose
    prompts are used up drops out; when all are, every prompt becomes available again)."""
    pools: dict[str, list] = {}
    drawn = []
    while len(drawn) < n:
        if not pools:
            pools = {family: list(group) for family, group in groups.items()}
            for pool in pools.values():
                rng.shuffle(pool)
        family = rng.choice(sorted(pools))
        drawn.append(pools[family].pop())
        if not pools[family]:
            del pools[family]
    return drawn


def draw_user(rng: random.Random) -> str:
    return rng.choices(USERS, weights=USER_WEIGHTS)[0]


def world_rng(seed: int, kind: str, world: str = "synthetic") -> random.Random:
    # A separate stream per world and file: changing one file's size leaves the others as they were.
    return random.Random(f"fastrlhf-{world}:{seed}:{kind}")


def draw_style(rng: random.Random, styles) -> str:
    """A labeler style from ``(name, template, share)`` triples, by share."""
    return rng.choices([name for name, _, _ in styles], weights=[share for *_, share in styles])[0]


# Demonstrations per prompt in the worlds whose labelers disagree: several labelers answer each prompt, so
# an SFT policy learns each prompt's *mix* of behaviours (which RL can then shift), instead of memorising
# one labeler's choice per prompt and sampling it deterministically.
LABELERS_PER_PROMPT = 3


def demonstrated_items(rng: random.Random, n: int, pool: dict[str, tuple] | None = None) -> list:
    """``n`` items for SFT demonstrations: ``ceil(n / LABELERS_PER_PROMPT)`` drawn items, each repeated
    for its labelers (the last one fewer times when ``n`` is not a multiple)."""
    drawn = draw_tasks(rng, -(-n // LABELERS_PER_PROMPT), pool)
    return [item for item in drawn for _ in range(LABELERS_PER_PROMPT)][:n]


def ranked_line(prompt: str, tiers: list[str], rng: random.Random, user: str) -> dict:
    """An RM line over K = 2..4 of ``tiers`` (responses listed best first): ranked 1..K in that order and
    shuffled, so that the position says nothing about the rank."""
    k = min(rng.choices((2, 3, 4), weights=(1, 1, 2))[0], len(tiers))
    chosen = sorted(rng.sample(range(len(tiers)), k))
    responses = [{"text": tiers[tier], "ranking": rank} for rank, tier in enumerate(chosen, start=1)]
    rng.shuffle(responses)
    return {"prompt": prompt, "responses": responses, "user": user}


def sft_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT lines ``{"prompt", "response", "user"}``; the response is the helpful demonstration."""
    rng = world_rng(seed, "sft")
    return [{"prompt": t.prompt, "response": t.helpful, "user": draw_user(rng)} for t in draw_tasks(rng, n)]


def response_tiers(task: Task, rng: random.Random) -> list[str]:
    """Four responses to ``task``, best first by ``preference_score``: the helpful sentence, the bare
    answer, a wrong answer in the helpful style, and an off-topic line."""
    wrong = task.sentence(rng.choice(task.wrong_answers))
    return [task.helpful, task.answer, wrong, rng.choice(OFF_TOPIC)]


def ranked_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` RM lines ``{"prompt", "responses": [{"text", "ranking"}], "user"}`` with K = 2..4 responses
    drawn from the four quality tiers of ``response_tiers``, ranked 1..K in tier order."""
    rng = world_rng(seed, "rm")
    return [ranked_line(t.prompt, response_tiers(t, rng), rng, draw_user(rng)) for t in draw_tasks(rng, n)]


def prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` PPO lines ``{"prompt", "family", "user"}`` (``family`` is an extra field readers ignore)."""
    rng = world_rng(seed, "ppo")
    return [{"prompt": t.prompt, "family": t.family, "user": draw_user(rng)} for t in draw_tasks(rng, n)]


def behaviour_ranked_examples(world: str, response_tiers, n: int, seed: int = 0) -> list[dict]:
    """``ranked_examples`` of a world over ``behaviour_pool()`` whose ranked tiers come from
    ``response_tiers(task, rng)``: the shared body of the behaviour worlds (``tasks.concise``, ...)."""
    rng = world_rng(seed, "rm", world)
    return [
        ranked_line(t.prompt, response_tiers(t, rng), rng, draw_user(rng))
        for t in draw_tasks(rng, n, behaviour_pool())
    ]


def behaviour_prompts(world: str, n: int, seed: int = 0) -> list[dict]:
    """``prompts`` of a world over ``behaviour_pool()``: ``{"prompt", "family", "user"}`` lines."""
    rng = world_rng(seed, "ppo", world)
    return [
        {"prompt": t.prompt, "family": t.family, "user": draw_user(rng)}
        for t in draw_tasks(rng, n, behaviour_pool())
    ]


def facts() -> list[str]:
    """Plain statements of the world's facts, for pretraining text."""
    facts = [f"{a} and {b} make {a + b}." for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    facts += [f"After {n} comes {n + 1}." for n in range(NUMBER_MAX + 1)]
    for items, noun in ((DAYS, "day"), (MONTHS, "month")):
        for i, item in enumerate(items):
            following = items[(i + 1) % len(items)]
            facts += [f"{following} is the {noun} after {item}.", f"{item} comes before {following}."]
    facts += [f"The colour of {phrase} is {colour}." for phrase, _, colour in COLOURED]
    facts += [f"{_capitalise(a)} and {b} are opposites." for a, b in OPPOSITE_PAIRS]
    facts += [f"The word {word} has {len(word)} letters." for word in SPELL_WORDS]
    facts += [f"The {a} {n} is in the garden." for a in ADJECTIVES for n in NOUNS]
    return facts


def pretraining_texts(n: int, seed: int = 0) -> list[dict]:
    """``n`` ptx lines ``{"text"}``: distinct short statements of the world's facts (``n`` at most the
    number of facts)."""
    statements = facts()
    if n > len(statements):
        raise InputError(f"n={n} is more than the {len(statements)} distinct facts of the synthetic world")
    return [{"text": text} for text in world_rng(seed, "ptx").sample(statements, n)]


def write_jsonl(path: str, lines: list[dict]) -> None:
    # Write then rename, so a reader never sees half a file.
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    os.replace(tmp, path)


def write_sample_data(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write the bundled task's ``sft.jsonl``, ``rm.jsonl``, ``ppo.jsonl`` and ``ptx.jsonl`` into
    ``out_dir``; returns their paths by kind. The default seed reproduces the bundled files."""
    from fastrlhf.data.tasks import BUNDLED_TASK, write_task_data

    return write_task_data(BUNDLED_TASK, out_dir, seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the synthetic sample data (default: the bundled files)."
    )
    parser.add_argument("--out-dir", default=SAMPLE_DIR, help="where to write the four JSONL files")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (0 reproduces the bundled files)")
    args = parser.parse_args(argv)
    for kind, path in write_sample_data(args.out_dir, args.seed).items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """``preference_score`` of each pair, in the ``--reward-fn`` / ``--eval-reward-fn`` signature: the
    known preference of the bundled world, to check what PPO against a *learned* reward model really
    improved (and to catch reward hacking)."""
    return [preference_score(p, r) for p, r in zip(prompts, responses, strict=True)]
