"""fastrlhf.data.batching: the next-token target convention, padding, packing (checked on a real tiny
Llama), length-grouped sampling and the packing rule."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastrlhf.data.batching import (
    IGNORE_INDEX,
    LengthGroupedBatchSampler,
    choose_packing,
    make_collator,
    model_inputs,
    pack_batch,
    pad_batch,
    padding_fraction,
)
from fastrlhf.data.tokenize import TokenizedSequence

PAD = 0
VOCAB = 97


def random_sequences(rng: random.Random, count: int, max_length: int = 12) -> list[TokenizedSequence]:
    """Sequences with every prompt shape: none (pretraining text), partial, and prompt-only."""
    out = []
    for i in range(count):
        length = rng.randint(1, max_length)
        prompt = [0, length, rng.randint(0, length)][i % 3]
        ids = tuple(rng.randint(1, VOCAB - 1) for _ in range(length))
        out.append(TokenizedSequence(ids, prompt, source=f"s:{i}"))
    return out


def slow_targets(seq: TokenizedSequence) -> list[int]:
    """The convention spelled out: position t predicts token t+1 when t+1 is a response token."""
    ids, p = seq.input_ids, seq.prompt_length
    return [ids[t + 1] if t + 1 < len(ids) and t + 1 >= p else IGNORE_INDEX for t in range(len(ids))]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_batch_against_a_slow_loop(fresh_seed, side):
    sequences = random_sequences(random.Random(fresh_seed), 9)
    batch = pad_batch(sequences, PAD, padding_side=side)
    width = max(len(s.input_ids) for s in sequences)
    assert batch["input_ids"].shape == (9, width) and batch["input_ids"].dtype == torch.long
    for b, seq in enumerate(sequences):
        n, pad = len(seq.input_ids), width - len(seq.input_ids)
        real = slice(pad, width) if side == "left" else slice(0, n)
        pads = [PAD] * pad
        row = pads + list(seq.input_ids) if side == "left" else list(seq.input_ids) + pads
        assert batch["input_ids"][b].tolist() == row
        mask = [0] * pad + [1] * n if side == "left" else [1] * n + [0] * pad
        assert batch["attention_mask"][b].tolist() == mask
        assert batch["position_ids"][b, real].tolist() == list(range(n))
        assert batch["targets"][b, real].tolist() == slow_targets(seq)
        assert (batch["targets"][b][torch.tensor(mask) == 0] == IGNORE_INDEX).all()
        assert (batch["prompt_lengths"][b], batch["lengths"][b]) == (seq.prompt_length, n)


def test_bare_ids_are_prompts_for_generation():
    batch = pad_batch([(5, 6, 7), (8,)], PAD, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert (batch["targets"] == IGNORE_INDEX).all() and batch["prompt_lengths"].tolist() == [3, 1]


def test_pack_batch_against_a_slow_loop(fresh_seed):
    sequences = random_sequences(random.Random(fresh_seed), 7)
    packed = pack_batch(sequences)
    flat_ids, flat_pos, flat_targets, bounds = [], [], [], [0]
    for seq in sequences:
        flat_ids += seq.input_ids
        flat_pos += range(len(seq.input_ids))
        flat_targets += slow_targets(seq)  # its last token is IGNORE: nothing crosses a boundary
        bounds.append(bounds[-1] + len(seq.input_ids))
    assert packed["input_ids"].tolist() == [flat_ids]
    assert packed["position_ids"].tolist() == [flat_pos]
    assert packed["targets"].tolist() == [flat_targets]
    assert packed["cu_seq_lens"].dtype == torch.int32 and packed["cu_seq_lens"].tolist() == bounds
    assert packed["max_length"] == max(len(s.input_ids) for s in sequences)
    assert "attention_mask" not in packed  # its absence is what makes transformers detect the packing
    padded = pad_batch(sequences, PAD)
    assert packed["targets"][0].tolist() == padded["targets"][padded["attention_mask"] == 1].tolist()


@pytest.fixture(scope="module")
def tiny_llama():
    def build(attn: str) -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()

    return {attn: build(attn) for attn in ("sdpa", "eager")}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_padded_logits(tiny_llama, fresh_seed, attn):
    """transformers 5.x detects packing from restarting position_ids under sdpa/eager too (when there is
    no attention_mask and no cache), so one packed row gives every sequence the logits it gets alone."""
    model = tiny_llama[attn]
    sequences = random_sequences(random.Random(fresh_seed), 5, max_length=16)
    right, left = pad_batch(sequences, PAD), pad_batch(sequences, PAD, padding_side="left")
    packed = pack_batch(sequences)
    with torch.no_grad():
        right_logits = model(**model_inputs(right)).logits
        left_logits = model(**model_inputs(left)).logits
        packed_logits = model(**model_inputs(packed)).logits[0]
        # control: the same row read as one long sequence, so the check can tell packing from not
        unpacked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    real_right, real_left = right["attention_mask"] == 1, left["attention_mask"] == 1
    torch.testing.assert_close(packed_logits, right_logits[real_right], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_logits[real_left], right_logits[real_right], rtol=1e-5, atol=1e-5)
    first = len(sequences[0].input_ids)
    assert not torch.allclose(unpacked[first:], right_logits[real_right][first:], atol=1e-3)


def test_packing_needs_use_cache_false(tiny_llama):
    """Documents the transformers 5.x trap that model_inputs avoids: with the config default use_cache=True
    the model builds a cache, find_packed_sequence_indices is skipped, and tokens attend across sequences.
    (Should this start failing, transformers detects packing with a cache too, and use_cache=False is
    merely harmless.)"""
    model = tiny_llama["sdpa"]
    assert model.config.use_cache
    sequences = [TokenizedSequence(tuple(range(1, 6)), 0), TokenizedSequence(tuple(range(10, 17)), 0)]
    packed = pack_batch(sequences)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([sequences[1].input_ids]), use_cache=False).logits[0]
        default = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0, 5:]
        fixed = model(**model_inputs(packed)).logits[0, 5:]
    torch.testing.assert_close(fixed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(default, alone, atol=1e-3)


def test_collator_in_a_dataloader(fresh_seed):
    sequences = random_sequences(random.Random(fresh_seed), 10)
    sampler = LengthGroupedBatchSampler([len(s.input_ids) for s in sequences], batch_size=4, seed=fresh_seed)
    for packing in (False, True):
        collate = pickle.loads(pickle.dumps(make_collator(PAD, packing)))  # spawn-started workers pickle it
        loader = torch.utils.data.DataLoader(sequences, batch_sampler=sampler, collate_fn=collate)
        batches = list(loader)
        assert len(batches) == len(sampler) == 3
        for indices, batch in zip(sampler, batches, strict=True):
            chosen = [sequences[i] for i in indices]
            expected = pack_batch(chosen) if packing else pad_batch(chosen, PAD)
            assert batch["targets"].tolist() == expected["targets"].tolist()
            assert ("cu_seq_lens" in batch) is packing


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_yields_every_index_once(fresh_seed, shuffle, drop_last):
    rng = random.Random(fresh_seed)
    lengths = [rng.randint(1, 500) for _ in range(1003)]
    sampler = LengthGroupedBatchSampler(lengths, 8, shuffle=shuffle, seed=fresh_seed, drop_last=drop_last)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == (125 if drop_last else 126)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        assert set(flat) <= set(range(1003)) and len(flat) == (1000 if drop_last else 1003)
        short = [b for b in batches if len(b) != 8]
        assert [len(b) for b in short] == ([] if drop_last else [3])
        cost = [len(b) * max(lengths[i] for i in b) for b in batches]
        assert cost[0] == max(cost)  # the worst batch first: an OOM shows at step 1


def test_sampler_is_deterministic_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    a = LengthGroupedBatchSampler(lengths, 4, seed=3)
    b = LengthGroupedBatchSampler(lengths, 4, seed=3)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)
    b.set_epoch(6)
    assert list(a) != list(b)
    assert list(LengthGroupedBatchSampler(lengths, 4, seed=4)) != list(LengthGroupedBatchSampler(lengths, 4))


def test_grouping_cuts_padding_on_skewed_lengths(fresh_seed):
    rng = random.Random(fresh_seed)
    # chat data is long-tailed: most responses short, a few near the limit
    lengths = [min(1024, int(rng.paretovariate(1.2) * 20)) for _ in range(4000)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[s : s + 16] for s in range(0, len(order), 16)]
    grouped = list(LengthGroupedBatchSampler(lengths, 16, seed=fresh_seed))
    random_fraction = padding_fraction(lengths, random_batches)
    grouped_fraction = padding_fraction(lengths, grouped)
    assert random_fraction > 0.5
    assert grouped_fraction < random_fraction / 4, (grouped_fraction, random_fraction)


def test_padding_fraction_by_hand():
    lengths = [4, 2, 3, 3]
    # batch [0, 1]: 2 * 4 slots, 6 real; batch [2, 3]: 2 * 3 slots, 6 real -> 2 pads in 14 slots
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(2 / 14)
    assert padding_fraction(lengths, [[0], [1], [2, 3]]) == 0.0
    assert padding_fraction(lengths, []) == 0.0


def test_choose_packing():
    assert choose_packing("flash_attention_2") is True
    assert choose_packing("sdpa") is False and choose_packing("eager") is False
    assert choose_packing("sdpa", "on") is True
    assert choose_packing("flash_attention_2", "off") is False
    with pytest.raises(ValueError, match="packing"):
        choose_packing("sdpa", "yes")


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], PAD)
    with pytest.raises(ValueError, match="empty sequence"):
        pack_batch([TokenizedSequence((), 0)])
    with pytest.raises(ValueError, match="padding_side"):
        pad_batch([(1,)], PAD, padding_side="middle")
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedBatchSampler([1, 2], 0)
