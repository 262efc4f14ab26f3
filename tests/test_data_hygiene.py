"""Dataset hygiene: prefix dedupe, per-user caps, and user-disjoint splits."""

from __future__ import annotations

import random

import pytest

from fastrlhf.data import PromptExample
from fastrlhf.data.hygiene import cap_per_user, clean, dedupe_by_prefix, split_by_user, split_users_by_share


def prompts(*texts, user=None):
    return [PromptExample(t, user) for t in texts]


def test_dedupe_drops_prompts_sharing_a_long_prefix():
    base = "Write a song about an ox plowing a field of data, " * 5  # 250 characters
    records = prompts(base + "in C major", base + "in D minor", "  WRITE a  song ", "write a song", "other")
    kept = dedupe_by_prefix(records, prefix_chars=200)
    # the two long prompts share 200+ leading characters; the short ones match after normalising
    assert [r.prompt for r in kept] == [base + "in C major", "  WRITE a  song ", "other"]
    assert len(dedupe_by_prefix(records, prefix_chars=10_000)) == 4  # the long ones differ at the end


def test_dedupe_keeps_a_short_prompt_that_is_a_prefix_of_a_long_one():
    long = "x" * 300
    kept = dedupe_by_prefix(prompts("x" * 50, long), prefix_chars=200)
    assert len(kept) == 2


def test_cap_per_user_keeps_the_first_and_leaves_anonymous_records():
    records = prompts(*[f"a{i}" for i in range(5)], user="alice") + prompts("b0", user="bob") + prompts("n")
    kept = cap_per_user(records, max_per_user=2)
    assert [r.prompt for r in kept] == ["a0", "a1", "b0", "n"]


def test_split_by_user_is_disjoint_deterministic_and_near_the_fraction():
    records = [PromptExample(f"p{u}-{i}", f"user{u}") for u in range(400) for i in range(3)]
    train, validation = split_by_user(records, validation_fraction=0.25, seed=3)
    train_users = {r.user for r in train}
    validation_users = {r.user for r in validation}
    assert not train_users & validation_users
    assert len(train) + len(validation) == len(records)
    assert 0.18 < len(validation_users) / 400 < 0.32
    assert split_by_user(records, 0.25, seed=3) == (train, validation)
    assert split_by_user(records, 0.25, seed=4) != (train, validation)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_users_by_share_holds_out_at_least_the_share_in_whole_users(fraction, seed):
    rng = random.Random(seed)
    # Users of very unequal size, as in real data, plus records without a user.
    records = [PromptExample(f"u{u}-{i}", f"user{u}") for u in range(30) for i in range(rng.randint(1, 20))]
    records += [PromptExample(f"anon-{i}") for i in range(7)]
    train, validation = split_users_by_share(records, fraction, seed)
    assert sorted(train + validation, key=lambda r: r.prompt) == sorted(records, key=lambda r: r.prompt)
    assert not {r.user for r in train if r.user} & {r.user for r in validation if r.user}
    held_users = {r.user or r.prompt for r in validation}
    sizes = {key: sum((r.user or r.prompt) == key for r in records) for key in held_users}
    # At least the share, and no more than the last user taken can add.
    assert len(validation) >= fraction * len(records)
    assert len(validation) - max(sizes.values()) < fraction * len(records)
    assert split_users_by_share(records, fraction, seed) == (train, validation)
    # Train order is preserved (the trainer's prompt order depends on it).
    assert train == [r for r in records if r in train]


def test_split_users_by_share_leaves_a_user_to_train_on():
    records = prompts("a", "b", "c", user="alice")
    assert split_users_by_share(records, 0.5) == (records, [])
    train, validation = split_users_by_share(prompts("a", user="alice") + prompts("b", user="bob"), 0.9)
    assert len(train) == 1 and len(validation) == 1


def test_split_users_by_share_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="validation_fraction"):
        split_users_by_share(prompts("a"), 1.0)


def test_clean_reports_each_step():
    records = prompts("same", "same", "x", user="u1") + prompts(*[f"v{i}" for i in range(4)], user="u2")
    train, validation, report = clean(records, max_per_user=3, validation_fraction=0.0)
    assert report.read == 7 and report.duplicates_dropped == 1 and report.over_user_cap_dropped == 1
    assert report.train == len(train) == 5 and report.validation == len(validation) == 0 and report.users == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: dedupe_by_prefix(r, 0), "prefix_chars"),
        (lambda r: cap_per_user(r, 0), "max_per_user"),
        (lambda r: split_by_user(r, 1.0), "validation_fraction"),
    ],
)
def test_bad_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call(prompts("a"))
