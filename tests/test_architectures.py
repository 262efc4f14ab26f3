"""Every command on each causal-LM architecture: sft, rm, ppo in all three actor/critic modes, generate and
score, end to end on tiny configs (``bench/architectures.py`` runs the chain; its table is in
docs/compat.md). Each architecture's numbers are checked against transformers' own forward in float64:
the trained policy's log-probs against ``log_softmax`` of its logits, the reward model's scores against
``AutoModelForSequenceClassification``. Tied and untied embeddings alternate across the architectures;
the bench runs both for each. Gemma 2, whose logits are soft-capped, is refused before any weights load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench_script
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fastrlhf.models.loading import load_causal_lm, load_tokenizer
from fastrlhf.models.policy import CausalLMPolicy
from fastrlhf.models.reward_model import RewardModel

TIED = {"llama": False, "qwen2": True, "mistral": False, "gemma": True, "gpt2": True, "gpt_neox": False}


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("architectures")


@pytest.fixture(scope="module")
def data(bench, tmp_path_factory):
    return bench.small_data(tmp_path_factory.mktemp("architecture-data"))


def _batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, T]`` ids (bos + text + eos) and mask."""
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


TEXTS = ["What is 3 plus 4? 3 plus 4 is 7.", "Write happy hat in capitals.", "Hello"]


def _check_policy_logprobs(model_dir: str):
    tokenizer = load_tokenizer(model_dir)
    ids, mask = _batch(tokenizer, TEXTS)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    policy = CausalLMPolicy(load_causal_lm(model_dir)).eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        ours = policy(targets, input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).double()
        logits = reference(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
        expected = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][targets != -100]
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def _check_reward_model(model_dir: str):
    tokenizer = load_tokenizer(model_dir)
    ids, mask = _batch(tokenizer, TEXTS)
    rm = RewardModel.from_pretrained(model_dir).eval()
    reference = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float64).eval()
    offset = json.loads(Path(model_dir, "config.json").read_text())["fastrlhf_reward"]["score_offset"]
    with torch.no_grad():
        ours = rm(input_ids=ids, attention_mask=mask).double()
        theirs = reference(input_ids=ids, attention_mask=mask).logits[:, 0] + offset
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("architecture", sorted(TIED))
def test_every_command_runs_on(architecture, bench, data, tmp_path):
    results = bench.run_chain(architecture, TIED[architecture], tmp_path, data)
    assert results == {cell: bench.OK for cell in bench.CELLS}, results
    run = tmp_path / f"{architecture}-{'tied' if TIED[architecture] else 'untied'}"
    config = json.loads((run / "base" / "config.json").read_text())
    assert config["tie_word_embeddings"] is TIED[architecture]
    _check_policy_logprobs(str(run / "sft" / "model"))
    _check_reward_model(str(run / "rm" / "model"))
    for mode in ("separate", "shared", "lora"):
        summary = json.loads((run / f"ppo-{mode}" / "summary.json").read_text())
        assert summary["steps"] == 1, (mode, summary)


def test_soft_capped_logits_are_refused_before_loading(bench, data, tmp_path, monkeypatch):
    from fastrlhf.models.tiny import build_tiny_model

    model = build_tiny_model(
        tmp_path / "gemma2", architecture="gemma2", tie_word_embeddings=True, **bench.SIZES
    )
    loaded = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loaded.append(args[0])
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    for cell in ("sft", "ppo separate"):
        command, flags = bench.command_flags(cell, Path(model), tmp_path / "runs", data)
        if cell != "sft":
            flags.update(reward_model="none", reward_fn="ppo_rewards:digit_fraction")
        flags["output"] = tmp_path / "runs" / cell.replace(" ", "-")
        result = bench.run_cell(command, flags)
        assert result.startswith(
            "InputError: (gemma2) soft-caps its logits (final_logit_softcapping=30.0)"
        ), result
        assert not os.path.exists(flags["output"]), "the refusal comes before the run directory is made"
    assert loaded == []
    # It can still be loaded for generation: sdpa cannot soft-cap attention, so "auto" picks eager.
    lm = load_causal_lm(model)
    assert lm.config._attn_implementation == "eager"
