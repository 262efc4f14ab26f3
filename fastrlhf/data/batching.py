"""Collation (padded or packed), length-grouped batch sampling, and the packing rule.

Every collated batch carries **next-token-aligned targets**: ``targets[b, t]`` is the token the model
must predict from position ``t``, i.e. ``input_ids[b, t + 1]`` when position ``t + 1`` is a response
token (``>= prompt_length``), and ``IGNORE_INDEX`` everywhere else: prompt and pad positions and the
last token of every sequence. A trainer gets per-token log-probs with no shifting::

    keep = batch["targets"] != IGNORE_INDEX
    logprobs = linear_logprobs(hidden[keep], lm_head.weight, batch["targets"][keep])

Packing (padding-free) concatenates the sequences into one row and restarts ``position_ids`` at 0 for
each. transformers reads the restarts as sequence boundaries: flash_attention_2 through its varlen
kernel, and (transformers 5.x, ``masking_utils.find_packed_sequence_indices``) sdpa/eager through a
block-diagonal mask. That detection runs only when ``attention_mask`` is None **and there is no KV
cache**; the models build a cache whenever ``use_cache`` is on, which is the config default even in
training, so a packed forward must pass ``use_cache=False`` (``model_inputs`` does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import DataCollatorWithFlattening

from fastrlhf.data.tokenize import TokenizedSequence

IGNORE_INDEX = -100  # the ignore_index of fastrlhf.ops and of torch's cross_entropy
VARLEN_ATTENTION = frozenset({"flash_attention_2", "flash_attention_3", "flash_attention_4"})
PACKING_CHOICES = ("auto", "on", "off")

SequenceLike = TokenizedSequence | Sequence[int]  # bare ids are a prompt (e.g. for generation)


def _ids_and_prompt(sequence: SequenceLike) -> tuple[Sequence[int], int]:
    if isinstance(sequence, TokenizedSequence):
        ids, prompt_length = sequence.input_ids, sequence.prompt_length
    else:
        ids = sequence
        prompt_length = len(ids)
    if len(ids) == 0:
        raise ValueError("cannot collate an empty sequence")
    return ids, prompt_length


def _unpack(sequences: Sequence[SequenceLike]) -> tuple[list[Sequence[int]], list[int]]:
    if len(sequences) == 0:
        raise ValueError("cannot collate an empty batch")
    pairs = [_ids_and_prompt(s) for s in sequences]
    return [ids for ids, _ in pairs], [p for _, p in pairs]


def pad_batch(
    sequences: Sequence[SequenceLike], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence. Right padding for training/scoring, left padding for generation.

    Returns (all int64):
        input_ids ``[B, T]``, pad elsewhere; attention_mask ``[B, T]`` (1 on real tokens);
        position_ids ``[B, T]``: 0, 1, ... from each row's first real token, 0 on pads;
        targets ``[B, T]``: next-token-aligned (module docstring), ``IGNORE_INDEX`` on pads;
        prompt_lengths ``[B]`` and lengths ``[B]``, counted within each sequence (under left padding
        sequence ``b`` starts at column ``T - lengths[b]``).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    ids, prompts = _unpack(sequences)
    lengths = torch.tensor([len(x) for x in ids])
    prompt_lengths = torch.tensor(prompts)
    width = int(lengths.max())
    start = width - lengths if padding_side == "left" else torch.zeros_like(lengths)
    local = torch.arange(width) - start[:, None]  # [B, T] position within the sequence (<0 / >=len: pad)
    real = (local >= 0) & (local < lengths[:, None])

    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    # boolean-mask assignment fills True slots in row-major order, i.e. sequence by sequence
    input_ids[real] = torch.tensor([token for x in ids for token in x], dtype=torch.long)

    next_ids = torch.full_like(input_ids, IGNORE_INDEX)
    next_ids[:, :-1] = input_ids[:, 1:]
    predicts_response = real & (local + 1 >= prompt_lengths[:, None]) & (local + 1 < lengths[:, None])
    return {
        "input_ids": input_ids,
        "attention_mask": real.long(),
        "position_ids": torch.where(real, local, 0),
        "targets": torch.where(predicts_response, next_ids, IGNORE_INDEX),
        "prompt_lengths": prompt_lengths,
        "lengths": lengths,
    }


def pack_batch(sequences: Sequence[SequenceLike]) -> dict:
    """Concatenate the batch into one row with no padding (for varlen attention).

    Returns:
        input_ids ``[1, N]`` and position_ids ``[1, N]`` (restarting at 0 per sequence), int64;
        targets ``[1, N]``: next-token-aligned, ``IGNORE_INDEX`` at each sequence's last token so no
        prediction crosses into the next sequence;
        cu_seq_lens ``[n + 1]`` int32 (sequence ``i`` spans ``cu_seq_lens[i]:cu_seq_lens[i+1]``);
        max_length: int, the longest sequence; prompt_lengths ``[n]`` and lengths ``[n]``, int64.
    There is deliberately no attention_mask: its absence is what lets transformers detect the packing.
    """
    ids, prompts = _unpack(sequences)
    # transformers' flattening collator labels token t of each sequence with itself (-100 on a sequence's
    # first token); shifting those labels left by one gives the next-token-aligned targets.
    labels = [[IGNORE_INDEX] * p + list(x[p:]) for x, p in zip(ids, prompts, strict=True)]
    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True, separator_id=IGNORE_INDEX)(
        [{"input_ids": list(x), "labels": y} for x, y in zip(ids, labels, strict=True)], return_tensors="pt"
    )
    targets = torch.full_like(flat["labels"], IGNORE_INDEX)
    targets[:, :-1] = flat["labels"][:, 1:]
    return {
        "input_ids": flat["input_ids"],
        "position_ids": flat["position_ids"],
        "targets": targets,
        "cu_seq_lens": flat["cu_seq_lens_q"],
        "max_length": int(flat["max_length_q"]),
        "prompt_lengths": torch.tensor(prompts),
        "lengths": torch.tensor([len(x) for x in ids]),
    }


def model_inputs(batch: dict) -> dict:
    """The keyword arguments of a training/scoring forward (``model(**model_inputs(batch))``) for a batch
    from ``pad_batch`` or ``pack_batch``. ``use_cache=False`` always: no forward here extends a cache,
    and a cache would silently switch off packed-sequence detection (module docstring)."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "cu_seq_lens" in batch:
        # flash-attention reads the boundaries from these instead of re-deriving them from position_ids;
        # the sdpa/eager paths ignore them.
        inputs.update(
            cu_seq_lens_q=batch["cu_seq_lens"],
            cu_seq_lens_k=batch["cu_seq_lens"],
            max_length_q=batch["max_length"],
            max_length_k=batch["max_length"],
        )
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


class Collator:
    """A picklable ``collate_fn`` (DataLoader workers may be spawned) over ``TokenizedSequence`` lists."""

    def __init__(self, pad_token_id: int, packing: bool, padding_side: str = "right"):
        self.pad_token_id, self.packing, self.padding_side = pad_token_id, packing, padding_side

    def __call__(self, sequences: Sequence[SequenceLike]) -> dict:
        if self.packing:
            return pack_batch(sequences)
        return pad_batch(sequences, self.pad_token_id, self.padding_side)


def make_collator(pad_token_id: int, packing: bool, padding_side: str = "right") -> Collator:
    """``collate_fn`` for ``torch.utils.data.DataLoader``: ``pack_batch`` or ``pad_batch``."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return Collator(pad_token_id, packing, padding_side)


def choose_packing(attn_implementation: str, requested: str = "auto") -> bool:
    """Whether to pack. "auto" packs only under flash-attention: its varlen kernels skip the padding
    compute, whereas sdpa/eager turn a packed row of N tokens into an N x N block-diagonal mask and do
    more work than padding would. "on" / "off" force it."""
    if requested not in PACKING_CHOICES:
        raise ValueError(f"packing must be one of {PACKING_CHOICES}, got {requested!r}")
    if requested == "auto":
        return attn_implementation in VARLEN_ATTENTION
    return requested == "on"


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The fraction of token slots that are padding when each batch of indices is padded to its longest:
    ``sum(B * max_len - sum(len)) / sum(B * max_len)``; 0.0 for no batches."""
    slots = real = 0
    for batch in batches:
        batch_lengths = [lengths[i] for i in batch]
        if batch_lengths:
            slots += len(batch_lengths) * max(batch_lengths)
            real += sum(batch_lengths)
    return (slots - real) / slots if slots else 0.0


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of indices with similar lengths, for ``DataLoader(batch_sampler=...)``.

    With ``shuffle``: a random permutation is cut into mega-batches of ``megabatch_batches`` batches,
    each mega-batch is sorted by length and cut into batches, and the batch order is shuffled, so
    batches stay random while padding shrinks. Without: every index sorted by length (longest first).
    Either way the batch with the most padded token slots comes first, so an out-of-memory shows at
    step 1 rather than hours in. Every index appears exactly once per epoch (only a short last batch
    is dropped, with ``drop_last``); the order is a function of ``(seed, epoch)`` alone. Call
    ``set_epoch`` yourself each epoch: accelerate's sharding wrapper does not forward it to a batch sampler.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        megabatch_batches: int = 50,  # HF Trainer's group_by_length uses 50: bigger pads less, mixes less
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if megabatch_batches <= 0:
            raise ValueError(f"megabatch_batches must be positive, got {megabatch_batches!r}")
        super().__init__()
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.megabatch_batches = megabatch_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        yield from self.batches(self.epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (what ``__iter__`` yields after ``set_epoch(epoch)``)."""
        n, size = len(self.lengths), self.batch_size
        by_length = lambda indices: sorted(indices, key=self.lengths.__getitem__, reverse=True)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
            mega = size * self.megabatch_batches
            order = [i for s in range(0, n, mega) for i in by_length(order[s : s + mega])]
        else:
            order = by_length(range(n))
        # the mega-batch size is a multiple of batch_size, so only the very last batch can be short
        batches = [order[s : s + size] for s in range(0, n, size)]
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        if self.shuffle and batches:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
            cost = lambda b: len(b) * max(self.lengths[i] for i in b)
            biggest = max(range(len(batches)), key=lambda i: cost(batches[i]))
            batches.insert(0, batches.pop(biggest))
        return batches
