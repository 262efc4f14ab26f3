"""DeepSpeed ZeRO-2 and ZeRO-3 through the shipped accelerate configs, for real: two processes over gloo
on CPU (DeepSpeed's CPU accelerator; fastrlhf switches accelerate to DeepSpeed on a CPU launch).

As for FSDP2, the reference is one process at the same global batch: two micro-batches of gradient
accumulation stand for the two processes' batches. PPO under ZeRO-2 and ZeRO-3 is compared with DDP
in tests/test_ppo.py.
"""

from __future__ import annotations

import sys

import pytest
from trainer_runs import (
    ACCELERATE_CONFIGS,
    final_weights_difference,
    interrupted_copy,
    launch_two_processes,
    run_rm,
    run_sft,
    train_losses,
)

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo launches are exercised on Linux")

STEPS, SAVE_EVERY = 12, 6
SFT_FLAGS = dict(max_steps=STEPS, save_every=SAVE_EVERY, batch_size=4)


@pytest.fixture(scope="module")
def sft_single(tmp_path_factory):
    output = tmp_path_factory.mktemp("deepspeed") / "sft_single"
    return output, run_sft(output, gradient_accumulation_steps=2, **SFT_FLAGS)


@pytest.mark.parametrize("stage", [2, 3])
def test_sft_under_zero_matches_one_process(stage, sft_single, tmp_path):
    single, single_summary = sft_single
    sharded = tmp_path / f"zero{stage}"
    summary = launch_two_processes(
        "sft", sharded, config_file=ACCELERATE_CONFIGS / f"zero{stage}.yaml", **SFT_FLAGS
    )
    assert summary["distributed_type"] == "DEEPSPEED" and summary["processes"] == 2
    # ZeRO-3 holds a partition of each weight; the count is of whole parameters all the same.
    assert summary["total_parameters"] == single_summary["total_parameters"]
    assert list((sharded / f"checkpoint-{STEPS:08d}" / "pytorch_model").iterdir())  # DeepSpeed's own format
    zero_curve, single_curve = train_losses(sharded), train_losses(single)
    assert sorted(zero_curve) == list(range(1, STEPS + 1)) == sorted(single_curve)
    for step in zero_curve:
        assert zero_curve[step] == pytest.approx(single_curve[step], abs=1e-4), step
    assert summary["eval_loss_end"] == pytest.approx(single_summary["eval_loss_end"], abs=1e-4)
    # Measured: 2.3e-5 (ZeRO-2), 9.9e-5 (ZeRO-3, 20 steps). AdamW turns float noise in a near-zero
    # gradient into a step of up to one learning rate, so the bound is a fraction of it.
    assert final_weights_difference(sharded, single) < 2e-4

    if stage == 2:
        # Interrupted after the step-6 checkpoint, resumed from it: the uninterrupted run's weights.
        resumed = interrupted_copy(sharded, SAVE_EVERY, tmp_path / "resumed")
        launch_two_processes(
            "sft", resumed, config_file=ACCELERATE_CONFIGS / "zero2.yaml", resume=True, **SFT_FLAGS
        )
        assert final_weights_difference(sharded, resumed) <= 1e-5
        assert train_losses(resumed) == pytest.approx(zero_curve, abs=1e-5)


def test_reward_model_under_zero3_matches_one_process(sft_single, tmp_path):
    """ZeRO-3 partitions the reward model from the moment transformers builds it; the final export (a
    sequence classifier built on the main process alone) must not wait on the other process."""
    flags = dict(model=sft_single[0] / "model", max_steps=6, batch_size=4)
    sharded = tmp_path / "rm_zero3"
    summary = launch_two_processes("rm", sharded, config_file=ACCELERATE_CONFIGS / "zero3.yaml", **flags)
    single_summary = run_rm(tmp_path / "rm_single", gradient_accumulation_steps=2, **flags)
    assert summary["distributed_type"] == "DEEPSPEED"
    zero_curve, single_curve = train_losses(sharded), train_losses(tmp_path / "rm_single")
    assert zero_curve.keys() == single_curve.keys()
    for step in zero_curve:
        assert zero_curve[step] == pytest.approx(single_curve[step], abs=1e-4), step
    for key in ("eval_accuracy_end", "eval_loss_end"):
        assert summary[key] == pytest.approx(single_summary[key], abs=1e-4), key
    assert final_weights_difference(sharded, tmp_path / "rm_single") <= 1e-3  # see test_fsdp2's reward model
    assert summary["normalization_bias"] == pytest.approx(single_summary["normalization_bias"], abs=2e-3)
