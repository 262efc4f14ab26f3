"""Reward models in transformers' sequence-classification format, both ways: what `fastrlhf rm` writes
loads with ``AutoModelForSequenceClassification`` and scores the same (exactly where the trunk's final
norm has a bias, up to the offset stored in config.json where it has none), and such a directory written
by transformers itself loads as a fastrlhf reward model. The reference is always transformers' own class
in float64; pooling goes through its own pad-token rule."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from fastrlhf.models.loading import load_tokenizer
from fastrlhf.models.reward_model import RewardModel, is_reward_model
from fastrlhf.models.reward_model_format import LEGACY_HEAD_FILE, REWARD_PAD_TOKEN, read_score_head
from fastrlhf.models.tiny import build_tiny_model, load_tiny_tokenizer

FIRST_ID = 6  # below: the tiny tokenizer's special tokens (pad 0, bos 1, eos 2, ...)
TEXT_ID_HIGH = 1000


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("llama") / "m",
        seed=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    """A GPT-2 whose tokenizer has no pad of its own (pad = eos, as GPT-2's): LayerNorm trunk."""
    directory = tmp_path_factory.mktemp("gpt2") / "m"
    torch.manual_seed(2)
    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=len(tokenizer),
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    without_pad = copy.deepcopy(tokenizer)
    without_pad.pad_token = None
    without_pad.save_pretrained(directory)
    return str(directory)


def _trained_looking(source: str, head_bias: float, normalization_bias: float) -> RewardModel:
    rm = RewardModel.from_pretrained(source).eval()
    with torch.no_grad():
        rm.head.proj.weight.normal_(0, 0.5)  # a head far from its init, like a trained one
        rm.head.proj.bias.fill_(head_bias)
    rm.set_normalization_bias(normalization_bias)
    return rm


def _responses(tokenizer, lengths, seed: int) -> list[list[int]]:
    """Sequences as fastrlhf scores them: bos, text ids, eos at the end."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [tokenizer.bos_token_id]
        + torch.randint(FIRST_ID, TEXT_ID_HIGH, (n,), generator=generator).tolist()
        + [tokenizer.eos_token_id]
        for n in lengths
    ]


def _padded(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span] = torch.tensor(sequence)
        mask[row, span] = 1
    return ids, mask


def _transformers_scores(directory, sequences, side: str) -> torch.Tensor:
    """transformers' class in float64, padded with the directory's own tokenizer's pad."""
    model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float64).eval()
    pad_id = AutoTokenizer.from_pretrained(directory).pad_token_id
    assert model.config.pad_token_id == pad_id
    ids, mask = _padded(sequences, pad_id, side)
    # Absolute-position trunks (GPT-2) need the positions of left-padded rows spelled out.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, 0]


def _fastrlhf_scores(rm: RewardModel, sequences, pad_id: int, side: str) -> torch.Tensor:
    ids, mask = _padded(sequences, pad_id, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return rm(input_ids=ids, attention_mask=mask, position_ids=positions).double()


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_fastrlhf_reward_model_loads_in_transformers_with_the_same_scores(
    architecture, llama_dir, gpt2_dir, tmp_path
):
    source = {"llama": llama_dir, "gpt2": gpt2_dir}[architecture]
    rm = _trained_looking(source, head_bias=0.4, normalization_bias=-2.3)
    out = tmp_path / "rm"
    rm.save_pretrained(out, load_tokenizer(source))
    config = json.loads((out / "config.json").read_text())["fastrlhf_reward"]
    assert config["normalization_bias"] == pytest.approx(-2.3)
    sequences = _responses(load_tokenizer(source), [5, 13, 1, 9], seed=3)
    ours = _fastrlhf_scores(rm, sequences, pad_id=0, side="right")
    for side in ("right", "left"):
        theirs = _transformers_scores(out, sequences, side)
        if architecture == "gpt2":
            # LayerNorm trunk: the constant is folded into ln_f's bias, transformers' scores are ours
            assert config == {
                "normalization_bias": config["normalization_bias"],
                "score_offset": 0.0,
                "folded_into": "ln_f",
            }
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        else:
            # RMSNorm trunk: nothing in transformers' class adds a constant; config.json keeps it
            assert config["folded_into"] is None and config["score_offset"] == pytest.approx(0.4 - 2.3)
            torch.testing.assert_close(theirs + config["score_offset"], ours, atol=1e-5, rtol=1e-5)
            assert (theirs - ours).abs().min() > 1.0
    # The in-memory model was not changed by the export (fold, embedding row and mode all undone).
    torch.testing.assert_close(_fastrlhf_scores(rm, sequences, pad_id=0, side="right"), ours, atol=0, rtol=0)


def test_an_eos_pad_gets_a_pad_token_of_its_own(gpt2_dir, tmp_path):
    """With pad = eos, transformers would score an eos-terminated response at the token before its eos."""
    source_tokenizer = load_tokenizer(gpt2_dir)
    assert source_tokenizer.pad_token_id == source_tokenizer.eos_token_id
    rm = _trained_looking(gpt2_dir, head_bias=0.0, normalization_bias=0.5)
    out = tmp_path / "rm"
    rm.save_pretrained(out, source_tokenizer)
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer.pad_token == REWARD_PAD_TOKEN
    new_id = saved_tokenizer.pad_token_id
    assert new_id == len(source_tokenizer) and new_id not in (saved_tokenizer.eos_token_id, None)
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == new_id and config["vocab_size"] == new_id + 1
    assert rm.trunk.get_input_embeddings().weight.shape[0] == new_id  # the in-memory trunk is unchanged
    # Every text id still encodes as before: the new token only pads.
    assert saved_tokenizer("the robot")["input_ids"] == source_tokenizer("the robot")["input_ids"]
    sequences = _responses(source_tokenizer, [4, 9, 2], seed=5)
    theirs = _transformers_scores(out, sequences, "right")
    ours = _fastrlhf_scores(rm, sequences, pad_id=source_tokenizer.pad_token_id, side="right")
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # and fastrlhf reads its own export back with the same scores, through the new pad
    reloaded = RewardModel.from_pretrained(str(out)).eval()
    torch.testing.assert_close(
        _fastrlhf_scores(reloaded, sequences, new_id, "left"), ours, atol=1e-5, rtol=1e-5
    )


def _foreign_classifier(kind: str, tokenizer, directory) -> str:
    """A reward model written by transformers itself, as TRL's RewardTrainer or a public model would be."""
    torch.manual_seed(7)
    common = dict(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            **common,
        )
        model = LlamaForSequenceClassification(config)
    else:
        config = GPTNeoXConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common
        )
        model = GPTNeoXForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_a_transformers_sequence_classifier_is_a_reward_model(kind, tokenizer, tmp_path):
    directory = _foreign_classifier(kind, tokenizer, tmp_path / "foreign")
    assert is_reward_model(directory)
    head = read_score_head(directory)
    assert head.offset == 0.0 and head.weight.shape == (1, 32)
    rm = RewardModel.from_pretrained(directory).eval()
    sequences = _responses(tokenizer, [3, 11, 7], seed=9)
    expected = _transformers_scores(directory, sequences, "right")
    for side in ("right", "left"):
        torch.testing.assert_close(_fastrlhf_scores(rm, sequences, 0, side), expected, atol=1e-5, rtol=1e-5)


def test_round_trip_through_transformers_keeps_the_scores(llama_dir, tmp_path):
    """fastrlhf -> transformers' class -> its save_pretrained -> fastrlhf: same scores, offset included."""
    rm = _trained_looking(llama_dir, head_bias=-0.2, normalization_bias=1.9)
    first = tmp_path / "first"
    rm.save_pretrained(first, load_tokenizer(llama_dir))
    model = AutoModelForSequenceClassification.from_pretrained(first)
    second = tmp_path / "second"
    model.save_pretrained(second)
    AutoTokenizer.from_pretrained(first).save_pretrained(second)
    sequences = _responses(load_tokenizer(llama_dir), [6, 2, 10], seed=11)
    reloaded = RewardModel.from_pretrained(str(second)).eval()
    torch.testing.assert_close(
        _fastrlhf_scores(reloaded, sequences, 0, "right"),
        _fastrlhf_scores(rm, sequences, 0, "right"),
        atol=1e-5,
        rtol=1e-5,
    )


def test_a_classifier_with_several_labels_is_refused(tokenizer, tmp_path):
    config = LlamaConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=len(tokenizer),
        num_labels=3,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"config.json: a sequence classifier with 3 labels; a reward model has one"
    ):
        RewardModel.from_pretrained(str(tmp_path))


def test_the_older_format_is_still_read(llama_dir, tmp_path):
    """A trunk directory plus score_head.safetensors (weight, bias, normalisation bias)."""
    rm = _trained_looking(llama_dir, head_bias=0.25, normalization_bias=-0.75)
    rm.trunk.save_pretrained(tmp_path)
    save_file(
        {
            "weight": rm.head.proj.weight.detach().clone(),
            "bias": rm.head.proj.bias.detach().clone(),
            "normalization_bias": torch.tensor([-0.75]),
        },
        tmp_path / LEGACY_HEAD_FILE,
    )
    assert is_reward_model(tmp_path)
    reloaded = RewardModel.from_pretrained(str(tmp_path)).eval()
    sequences = _responses(load_tokenizer(llama_dir), [4, 8], seed=13)
    torch.testing.assert_close(
        _fastrlhf_scores(reloaded, sequences, 0, "right"),
        _fastrlhf_scores(rm, sequences, 0, "right"),
        atol=1e-6,
        rtol=0,
    )
