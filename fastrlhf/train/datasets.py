"""From a JSONL path to train / held-out records and a DataLoader: the part SFT and RM share; and the split of
pretraining text into the lines trained on (SFT mixing, PPO-ptx) and the lines whose perplexity is
measured."""

from __future__ import annotations

import dataclasses
import logging

import torch

from fastrlhf.data.batching import LengthGroupedBatchSampler, padding_fraction
from fastrlhf.data.bundled import data_path
from fastrlhf.data.hygiene import split_by_user
from fastrlhf.data.readers import read_jsonl
from fastrlhf.data.tokenize import TruncationPolicy
from fastrlhf.errors import InputError

log = logging.getLogger(__name__)


def load_train_eval(data: str, eval_data: str | None, kind: str, validation_fraction: float, seed: int):
    """Records of ``--data`` and of ``--eval-data``; without the latter, a user-disjoint held-out split."""
    records = read_jsonl(data_path(data, kind), kind)
    if eval_data:
        return records, read_jsonl(data_path(eval_data, kind, "eval_data"), kind)
    if validation_fraction == 0:
        return records, []
    train, held_out = split_by_user(records, validation_fraction, seed)
    if not train:
        raise InputError(
            f"data: the held-out split took every example of {data}; lower --validation-fraction"
        )
    return train, held_out


HELD_OUT_TEXT_EVERY = 10  # every 10th line of a pretraining text file is held out for the perplexity


def split_texts(train_path: str | None, eval_path: str, tokenizer, max_tokens: int = 128):
    """``(training sequences, held-out sequences)`` of pretraining text (``{"text"}`` JSONL paths or
    'sample'): every 10th line of ``eval_path`` is held out, and when ``train_path`` is the same file those
    lines are removed from it, so no stage trains on the text whose perplexity measures the alignment tax.
    """
    from fastrlhf.data.tokenize import tokenize_texts

    eval_file = data_path(eval_path, "ptx", "eval_text")
    held_out = read_jsonl(eval_file, "ptx")[::HELD_OUT_TEXT_EVERY]
    train_records = []
    if train_path:
        train_file = data_path(train_path, "ptx", "ptx_data")
        train_records = read_jsonl(train_file, "ptx")
        if train_file.resolve() == eval_file.resolve():
            held = {r.source for r in held_out}
            train_records = [r for r in train_records if r.source not in held]
    train, _ = tokenize_texts(train_records, tokenizer, max_tokens) if train_records else ([], None)
    evaluation, _ = tokenize_texts(held_out, tokenizer, max_tokens)
    return train, evaluation


@dataclasses.dataclass
class SupervisedData:
    """A supervised run's data: the tokenizer, the truncation policy, the training records and both
    tokenised splits (``TokenizedSequence`` for SFT, ``TokenizedGroup`` for the RM), and the report."""

    tokenizer: object
    truncation: TruncationPolicy
    train_records: list
    train: list
    eval: list
    report: object


def load_tokenized(config, tokenize) -> SupervisedData:
    """Read ``config.data`` (and ``--eval-data`` or a user split), then ``tokenize(records, tokenizer,
    truncation) -> (items, report)`` both splits with ``config.model``'s tokenizer."""
    from fastrlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    truncation = TruncationPolicy(config.max_prompt_tokens, config.max_response_tokens)
    train_records, eval_records = load_train_eval(
        config.data, config.eval_data, config.data_format, config.validation_fraction, config.seed
    )
    train, report = tokenize(train_records, tokenizer, truncation)
    held_out, _ = tokenize(eval_records, tokenizer, truncation)
    return SupervisedData(tokenizer, truncation, train_records, train, held_out, report)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def make_loader(
    items: list,
    lengths: list[int],
    batch_size: int,
    collate,
    *,
    shuffle: bool,
    group_by_length: bool,
    seed: int,
):
    """A DataLoader over ``items`` and the padding fraction its batching leaves.

    With ``group_by_length`` the batches hold examples of similar length (less padding); otherwise
    they are plain shuffled (or sequential) batches. Returns ``(loader, batch_sampler, padding_fraction)``;
    the caller sets the epoch on the batch sampler (``set_epoch``) when it has one.
    """
    if group_by_length:
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed)
    else:
        generator = torch.Generator().manual_seed(seed)
        base = (
            torch.utils.data.RandomSampler(items, generator=generator)
            if shuffle
            else torch.utils.data.SequentialSampler(items)
        )
        sampler = torch.utils.data.BatchSampler(base, batch_size, drop_last=False)
    batches = list(iter(sampler))
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_sampler=sampler, collate_fn=collate)
    return loader, sampler, padding_fraction(lengths, batches)


def local_eval_loader(items: list, length_of, batch_size: int, collate, accelerator):
    """A loader over this process's slice of the held-out ``items`` (every ``num_processes``-th one).

    Each process evaluates its own slice with the unwrapped model and the sums are reduced once: exact
    (no padded duplicates, unlike a sharded loader's even batches) and with no DDP collective inside a
    loop whose length may differ between processes. ``length_of(item)`` gives the grouping length.
    """
    local = items[accelerator.process_index :: accelerator.num_processes]
    loader, _, _ = make_loader(
        local,
        [length_of(item) for item in local],
        batch_size,
        collate,
        shuffle=False,
        group_by_length=True,
        seed=0,
    )
    return loader
