"""``--trust-remote-code``: a model directory that ships its own Python code (config.json's auto_map) is
refused by default, with the flag to pass, before any of that code runs; with the flag, sft, rm and
score run on it, and its reward model is written in the standard format through its own classifier."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_runs import run_rm, run_sft

from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
from fastrlhf.models.reward_model import RewardModel
from fastrlhf.models.tiny import build_tiny_model

CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""

MODELING = """
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomModel(LlamaModel):
    config_class = TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig


class TinyCustomForSequenceClassification(LlamaForSequenceClassification):
    config_class = TinyCustomConfig
"""


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    """A Llama renamed into a model type transformers does not know, whose classes live in its directory."""
    directory = tmp_path_factory.mktemp("remote") / "tiny_custom"
    build_tiny_model(
        directory, seed=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    (directory / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (directory / "modeling_tiny_custom.py").write_text(MODELING)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="tiny_custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModel": "modeling_tiny_custom.TinyCustomModel",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
            "AutoModelForSequenceClassification": "modeling_tiny_custom.TinyCustomForSequenceClassification",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_remote_code_is_refused_by_default_with_the_flag_to_pass(custom_model, tmp_path):
    message = (
        r"ships its own code \(configuration_tiny_custom.py, modeling_tiny_custom.py.*"
        r"--trust-remote-code true"
    )
    with pytest.raises(ValueError, match=message):
        load_causal_lm(str(custom_model))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(custom_model))
    with pytest.raises(ValueError, match=message):
        run_sft(tmp_path / "sft", model=custom_model, max_steps=1)
    assert not (tmp_path / "sft").exists()
    assert ModelOptions().trust_remote_code is False


def test_with_the_flag_the_model_trains_and_its_reward_model_is_standard(custom_model, tmp_path):
    lm = load_causal_lm(str(custom_model), ModelOptions(trust_remote_code=True))
    assert type(lm).__name__ == "TinyCustomForCausalLM"
    summary = run_sft(tmp_path / "sft", model=custom_model, trust_remote_code=True, max_steps=2, eval_every=0)
    assert summary["steps"] == 2
    sft_model = tmp_path / "sft" / "model"
    run_rm(tmp_path / "rm", model=sft_model, trust_remote_code=True, max_steps=2, eval_every=0)
    rm_dir = tmp_path / "rm" / "model"
    config = json.loads((rm_dir / "config.json").read_text())
    assert config["architectures"] == ["TinyCustomForSequenceClassification"]
    with pytest.raises(ValueError, match="--trust-remote-code true"):
        RewardModel.from_pretrained(str(rm_dir))
    rm = RewardModel.from_pretrained(str(rm_dir), ModelOptions(trust_remote_code=True)).eval()
    from transformers import AutoModelForSequenceClassification

    reference = AutoModelForSequenceClassification.from_pretrained(
        rm_dir, trust_remote_code=True, dtype=torch.float64
    ).eval()
    ids = torch.tensor([[1, 40, 41, 42, 2], [1, 50, 2, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = rm(input_ids=ids, attention_mask=mask).double()
    torch.testing.assert_close(ours, theirs + config["fastrlhf_reward"]["score_offset"], atol=1e-5, rtol=1e-5)
