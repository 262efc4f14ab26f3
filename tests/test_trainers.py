"""The SFT and reward-model trainers, end to end on the tiny model and the bundled data (CPU)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import (
    ACCELERATE_CONFIGS,
    crash_after_checkpoint,
    launch_two_processes,
    read_lines,
    run_rm,
    run_sft,
)

from fastrlhf.data import synthetic
from fastrlhf.data.tasks import BUNDLED_TASK, task_module
from fastrlhf.train.checkpoint import latest_checkpoint
from fastrlhf.train.metrics import read_metrics


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """Two epochs of SFT on the bundled demonstrations (about 40 optimizer steps), with bitsandbytes'
    8-bit AdamW (the default on a GPU; on CPU the default is torch's AdamW)."""
    output = tmp_path_factory.mktemp("sft")
    summary = run_sft(output, epochs=2, optimizer="adamw8bit", plots=True)
    return output, summary


@pytest.fixture(scope="module")
def rm_run(sft_run, tmp_path_factory):
    """One epoch of RM training from the SFT model, evaluated on fresh rankings from the same generator."""
    output = tmp_path_factory.mktemp("rm")
    held_out = output.parent / "held_out_rm.jsonl"
    # A different seed than the bundled file: prompts and rankings the RM never saw.
    rows = task_module(BUNDLED_TASK).ranked_examples(150, seed=12345)
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = run_rm(output, model=sft_run[0] / "model", eval_data=held_out)
    return output, summary


def test_sft_loss_drops_by_a_large_margin(sft_run):
    output, summary = sft_run
    start, end = summary["eval_loss_start"], summary["eval_loss_end"]
    # An untrained 1024-token model starts near ln(1024) = 6.9 nats per token.
    assert start > 6.0
    assert end < 0.6 * start, (start, end)
    metrics = read_metrics(output / "metrics.jsonl")
    train_losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert sum(train_losses[-5:]) / 5 < 0.6 * sum(train_losses[:5]) / 5


def test_sft_run_directory_is_complete(sft_run):
    output, summary = sft_run
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "lr.png"):
        assert (output / name).is_file(), name
    assert latest_checkpoint(output) is not None
    assert json.loads((output / "summary.json").read_text())["steps"] == summary["steps"]
    # bitsandbytes' 8-bit AdamW, and its saved state really is 8-bit.
    assert summary["optimizer"] == "AdamW8bit"
    optimizer_state = torch.load(latest_checkpoint(output) / "optimizer.bin", weights_only=False)["state"]
    # bitsandbytes saves its quantized moments under one nested key per parameter.
    moments = [s.get("__bnb_optimizer_quant_state__", s).get("state1") for s in optimizer_state.values()]
    assert any(m is not None and m.dtype == torch.uint8 for m in moments)
    # The learning rate decays with a cosine to 10% of the peak.
    lrs = [m["lr"] for m in read_metrics(output / "metrics.jsonl") if "lr" in m]
    assert lrs[-1] == pytest.approx(0.1 * 2e-3, rel=0.05)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_sft_model_reloads_and_generates_the_taught_answers(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = sft_run[0] / "model"
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert lm.config.vocab_size == len(tokenizer)
    # The reloaded weights are the trained ones: their held-out NLL is far below the untrained start.
    from fastrlhf.data import make_collator, model_inputs, read_jsonl, tokenize_sft
    from fastrlhf.data.tokenize import TruncationPolicy
    from fastrlhf.models.policy import CausalLMPolicy

    records = read_jsonl(synthetic.SAMPLE_DIR + "/sft.jsonl", "sft")[:32]
    sequences, _ = tokenize_sft(records, tokenizer, TruncationPolicy())
    batch = make_collator(tokenizer.pad_token_id, packing=False)(sequences)
    with torch.no_grad():
        logprobs = CausalLMPolicy(lm.eval())(batch["targets"], **model_inputs(batch))
    assert -logprobs.mean() < 0.6 * sft_run[1]["eval_loss_start"]


def test_rm_accuracy_on_held_out_rankings_is_well_above_chance(rm_run):
    output, summary = rm_run
    # Chance is 0.5 for every pair. The generator's preference is strict, so a trained RM should order
    # most held-out pairs right.
    assert summary["eval_accuracy_end"] > 0.7, summary
    assert summary["eval_accuracy_end"] > summary["eval_accuracy_start"] + 0.05


def test_rm_saves_head_and_normalisation_bias_and_demonstrations_score_zero(rm_run):
    from fastrlhf.data import SFTExample, read_jsonl
    from fastrlhf.data.tokenize import TruncationPolicy
    from fastrlhf.inference.score import score_pairs
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.models.reward_model import RewardModel

    output, summary = rm_run
    model_dir = output / "model"
    saved = json.loads((model_dir / "config.json").read_text())["fastrlhf_reward"]
    assert saved["normalization_bias"] == pytest.approx(summary["normalization_bias"])
    assert summary["normalization_bias"] != 0.0
    reward_model = RewardModel.from_pretrained(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    # The bias was set from the rank-1 responses of the training split; those now average 0.
    records = read_jsonl(synthetic.SAMPLE_DIR + "/rm.jsonl", "rm")
    demonstrations = [SFTExample(r.prompt, r.best, r.user, r.source) for r in records]
    scores = score_pairs(reward_model, tokenizer, demonstrations, TruncationPolicy(), batch_size=64)
    assert abs(sum(scores) / len(scores)) < 0.25 * (max(scores) - min(scores))


def test_lora_sft_trains_only_adapters_and_saves_a_merged_model(tmp_path):
    summary = run_sft(tmp_path / "lora", epochs=1, lora_r=8, lora_alpha=16, learning_rate=5e-3)
    assert summary["trainable_parameters"] < 0.2 * summary["total_parameters"]
    assert summary["eval_loss_end"] < summary["eval_loss_start"] - 0.5, summary
    weights = load_file(tmp_path / "lora" / "model" / "model.safetensors")
    assert not any("lora" in name for name in weights), "the final model must be a plain (merged) HF model"


def test_resumed_run_continues_where_the_interrupted_one_stopped(tmp_path, monkeypatch):
    flags = dict(epochs=2, max_steps=10, save_every=4, batch_size=32, eval_every=5)
    reference = run_sft(tmp_path / "reference", **flags)

    # Interrupt the second run right after its step-8 checkpoint is on disk.
    crash_after_checkpoint(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_sft(tmp_path / "interrupted", **flags)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "interrupted").name == "checkpoint-00000008"

    resumed = run_sft(tmp_path / "interrupted", resume=True, **flags)
    assert resumed["steps"] == reference["steps"] == 10
    # Same data order, RNG, optimizer and schedule: the resumed run ends with the same weights.
    final = load_file(tmp_path / "interrupted" / "model" / "model.safetensors")
    expected = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    steps = [m["step"] for m in read_lines(tmp_path / "interrupted" / "metrics.jsonl") if "train/loss" in m]
    assert steps == list(range(1, 11)), "a resumed run logs each step once"


def test_a_finished_run_directory_is_not_overwritten(sft_run):
    with pytest.raises(ValueError, match="already holds a run"):
        run_sft(sft_run[0], epochs=1)


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        run_sft(tmp_path / "empty", resume=True)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process launch is exercised on Linux")
def test_same_command_under_accelerate_launch_with_two_processes(tmp_path):
    output = tmp_path / "ddp"
    summary = launch_two_processes(
        "sft", output, config_file=ACCELERATE_CONFIGS / "ddp.yaml", max_steps=6, batch_size=8
    )
    assert summary["processes"] == 2, "accelerate formed a 2-process (gloo) group"
    assert summary["distributed_type"] == "MULTI_CPU"
    assert len(summary["peak_memory_mib_per_process"]) == 2
    assert summary["steps"] == 6
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    assert (output / "model" / "model.safetensors").is_file()
    assert latest_checkpoint(output) is not None
