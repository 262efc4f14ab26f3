"""Faults injected into real runs: a SIGTERM mid-run, NaN losses and gradients, a second run on one
output directory, PPO without held-out prompts. Each checks that nothing is lost and nothing non-finite
is saved."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import read_lines, run_ppo, run_rm, run_sft, to_argv

from fastrlhf.cli import main
from fastrlhf.train.checkpoint import latest_checkpoint
from fastrlhf.train.guards import NonFiniteError, NonFiniteGuard

TESTS = Path(__file__).parent
PPO_RULE = dict(
    reward_model="none",
    reward_fn="ppo_rewards:digit_fraction",
    reward_fn_weight=10,
    max_new_tokens=8,
    rollout_batch_size=8,
    minibatch_size=8,
    eval_samples=1,
    eval_max_new_tokens=8,
)
# Small runs of each trainer, with an interruption point in the middle of each.
RUNS = {
    "sft": (dict(max_steps=8, batch_size=16, save_every=100), 3),
    "rm": (dict(max_steps=6, batch_size=8, save_every=100), 3),
    # PPO-ptx, an EMA, and a ragged last minibatch (8 rows in minibatches of 6) split in 2 micro-batches.
    "ppo": (
        {
            **PPO_RULE,
            "steps": 6,
            "ptx_data": "sample",
            "ema_decay": 0.9,
            "minibatch_size": 6,
            "gradient_accumulation_steps": 2,
        },
        3,
    ),
}


def _cli(kill_at: int, command: str, output: Path, **flags) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    argv = [sys.executable, str(TESTS / "signal_runner.py"), str(kill_at), command]
    argv += to_argv(output=str(output), **flags)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def _weights(run_dir: Path) -> dict:
    directory = run_dir / "model"
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no weights in {directory}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


IN_PROCESS = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo}


@pytest.mark.parametrize("command", sorted(RUNS))
def test_sigterm_checkpoints_and_the_resumed_run_ends_bit_identical(command, tmp_path):
    """The run that gets the signal is its own process, killed through the kernel; the uninterrupted
    run and the resumed one run in this process (a process each would add ~10 s of imports to each
    test), so the resumed weights also match across processes, bit for bit."""
    flags, kill_at = RUNS[command]
    IN_PROCESS[command](tmp_path / "whole", **flags)

    stopped = _cli(kill_at, command, tmp_path / "stopped", **flags)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM" in stopped.stderr and "--resume" in stopped.stderr
    assert latest_checkpoint(tmp_path / "stopped").name == f"checkpoint-{kill_at:08d}"
    assert not (tmp_path / "stopped" / "model").exists(), "an interrupted run writes no final model"

    IN_PROCESS[command](tmp_path / "stopped", resume="true", **flags)
    expected, final = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name
    logged = [m["step"] for m in read_lines(tmp_path / "stopped" / "metrics.jsonl") if "lr" in m]
    assert logged == sorted(set(logged)), "each step is logged once across the interruption"


def test_guard_skips_non_finite_steps_and_stops_after_too_many_in_a_row():
    class OneProcess:
        num_processes, device = 1, torch.device("cpu")

    guard = NonFiniteGuard(OneProcess(), max_consecutive=3)
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    assert guard.step_is_finite(1, [finite], 0.5)
    assert not guard.step_is_finite(2, [finite, nan], 0.5)
    assert not guard.step_is_finite(3, [finite], math.inf)
    assert guard.step_is_finite(4, [finite], None), "None: the gradient norm is not checked"
    assert guard.skipped == 2 and guard.consecutive == 0
    assert not guard.step_is_finite(5, [nan], 1.0)
    assert not guard.step_is_finite(6, [nan], 1.0)
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        guard.step_is_finite(7, [nan], 1.0)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(OneProcess(), max_consecutive=0)


def _poison_policy_output(monkeypatch, calls_to_poison):
    """Make the SFT policy's log-probs NaN on the given (1-based) forward calls in training mode."""
    from fastrlhf.models.policy import CausalLMPolicy

    original, calls = CausalLMPolicy.forward, {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] in calls_to_poison:
                return out * float("nan")
        return out

    monkeypatch.setattr(CausalLMPolicy, "forward", forward)


def test_a_nan_loss_is_skipped_and_the_run_finishes_with_finite_weights(tmp_path, monkeypatch):
    _poison_policy_output(monkeypatch, {3})
    summary = run_sft(tmp_path / "run", max_steps=6, batch_size=16)
    assert summary["steps"] == 6
    logged = [m for m in read_lines(tmp_path / "run" / "metrics.jsonl") if "train/loss" in m]
    assert logged[-1]["train/skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "run").values())


def test_a_run_that_keeps_producing_nan_stops_without_saving_nan(tmp_path, monkeypatch, capsys):
    _poison_policy_output(monkeypatch, set(range(3, 100)))
    code = main(
        [
            "sft",
            "--output",
            str(tmp_path / "run"),
            "--max-steps",
            "20",
            "--batch-size",
            "16",
            "--save-every",
            "1",
            "--max-nonfinite-steps",
            "4",
        ]
    )
    assert code == 3
    assert "diverged" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-00000005", "steps 3-5 were skipped, the 4th skip stopped it"
    for path in checkpoint.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_ppo_skips_a_step_with_a_nan_gradient(tmp_path, monkeypatch):
    import fastrlhf.train.update as update

    original, calls = update.backward_micro_batch, {"n": 0}

    def poisoned(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(update, "backward_micro_batch", poisoned)
    run_ppo(tmp_path / "run", steps=3, **PPO_RULE)
    steps = [m for m in read_lines(tmp_path / "run" / "metrics.jsonl") if "score/mean" in m]
    assert steps[-1]["skipped_nonfinite_steps"] == 1
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path / "run").values())


def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_holder(tmp_path, capsys):
    output = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fastrlhf.train.lock import RunDirectoryLock; "
            "RunDirectoryLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(output),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        code = main(["sft", "--output", str(output), "--max-steps", "1"])
        assert code == 2 and time.perf_counter() - start < 30
        error = capsys.readouterr().err
        assert f"PID {holder.pid}" in error and "in use by another run" in error
        assert not (output / "config.yaml").exists(), "the second run wrote nothing"
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory is usable at once.
    assert run_sft(output, max_steps=1, batch_size=16)["steps"] == 1


def test_ppo_without_held_out_prompts_runs_and_says_it_skipped_the_evaluation(tmp_path, caplog):
    summary = run_ppo(tmp_path / "run", steps=2, validation_fraction=0.0, **PPO_RULE)
    assert summary["eval_prompts"] == 0 and summary["steps"] == 2
    assert "no held-out prompts" in caplog.text
    assert (tmp_path / "run" / "model").is_dir() and latest_checkpoint(tmp_path / "run") is not None


def test_a_non_finite_rule_reward_is_an_error_naming_the_prompt(tmp_path):
    flags = {**PPO_RULE, "reward_fn": "ppo_rewards:nan_for_the_first"}
    with pytest.raises(
        ValueError, match=r"non-finite reward \(nan\) for 1 of \d+ responses, first to prompt '"
    ):
        run_ppo(tmp_path / "run", steps=1, **flags)
    assert not (tmp_path / "run" / "model").exists()


def test_a_non_finite_reward_model_score_is_an_error_naming_the_prompt():
    from fastrlhf.train.rollout import score_rollout

    def reward_model(**inputs):
        return torch.tensor([0.5, float("inf"), 0.1])

    ids = torch.ones(3, 4, dtype=torch.long)
    batch = {"input_ids": ids, "position_ids": torch.arange(4).expand(3, 4), "attention_mask": ids}
    with pytest.raises(ValueError, match=r"reward model gave a non-finite score \(inf\).*prompt 'b'"):
        score_rollout(reward_model, None, batch, ["a", "b", "c"], ["x", "y", "z"], 1.0)


def test_score_clip_bounds_the_scores_ppo_optimises(tmp_path):
    flags = {**PPO_RULE, "reward_fn_weight": 100, "reward_norm": "none", "missing_eos_penalty": 0}
    run_ppo(tmp_path / "run", steps=3, score_clip=0.05, **flags)
    steps = [m for m in read_lines(tmp_path / "run" / "metrics.jsonl") if "score/mean" in m]
    assert any(m["score/mean"] > 0.05 for m in steps), "the raw scores exceed the clip"
    assert all(-0.05 <= m["score/normalized"] <= 0.05 for m in steps)


def test_weights_holding_nan_are_never_saved():
    from fastrlhf.train.guards import check_finite_parameters

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    check_finite_parameters(model, "a checkpoint")
    with torch.no_grad():
        model[1].bias.fill_(float("-inf"))
    with pytest.raises(NonFiniteError, match="a checkpoint: parameter 1.bias holds non-finite values"):
        check_finite_parameters(model, "a checkpoint")


def test_a_reward_model_with_a_non_finite_normalisation_bias_is_not_saved(tmp_path, monkeypatch):
    import fastrlhf.train.rm as rm

    monkeypatch.setattr(rm, "score_pairs", lambda *args, **kwargs: [0.5, float("nan"), 1.0])
    with pytest.raises(NonFiniteError, match="1 of 3 demonstrations as NaN/inf"):
        run_rm(tmp_path / "rm", max_steps=1, batch_size=8)
    assert not (tmp_path / "rm" / "model").exists()


@pytest.mark.parametrize("command", ["rm", "ppo"])
def test_two_runs_with_one_seed_end_with_identical_weights(command, tmp_path):
    runner = {"rm": run_rm, "ppo": run_ppo}[command]
    flags = RUNS[command][0]
    runner(tmp_path / "first", seed=7, **flags)
    runner(tmp_path / "second", seed=7, **flags)
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name


# ---- clean failures: each kind of fault has its own exit code and a one-line message --------------------


def _raise_in_sft_forward(monkeypatch, error: BaseException) -> None:
    from fastrlhf.models.policy import CausalLMPolicy

    def forward(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(CausalLMPolicy, "forward", forward)


def test_bad_flag_values_are_bad_input(tmp_path, capsys):
    assert main(["sft", "--output", str(tmp_path / "run"), "--learning-rate", "-1"]) == 2
    assert "learning_rate must be > 0" in capsys.readouterr().err


def test_an_unwritable_output_exits_4_naming_the_path(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["sft", "--output", str(blocker / "run"), "--max-steps", "1"]) == 4
    error = capsys.readouterr().err
    assert "cannot read or write" in error and str(blocker) in error


def test_a_full_disk_during_a_checkpoint_exits_4(tmp_path, monkeypatch, capsys):
    import errno

    import fastrlhf.train.checkpoint as checkpoint

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_text", full)
    code = main(["sft", "--output", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "16"])
    assert code == 4
    assert "No space left on device" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run") is None, "no half-written checkpoint counts as one"


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_exits_5_naming_the_batch_flags(error, tmp_path, monkeypatch, capsys):
    _raise_in_sft_forward(monkeypatch, error)
    assert main(["sft", "--output", str(tmp_path / "run"), "--max-steps", "1"]) == 5
    message = capsys.readouterr().err
    assert "out of memory" in message and "--batch-size" in message


def test_a_bug_inside_the_code_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError that is not the user's input (here from inside the model) is not reported as exit 2."""
    _raise_in_sft_forward(monkeypatch, ValueError("shapes [3, 4] and [5] do not broadcast"))
    with pytest.raises(ValueError, match="do not broadcast"):
        main(["sft", "--output", str(tmp_path / "run"), "--max-steps", "1"])


@pytest.mark.parametrize(
    "command, flag", [("sft", "--data"), ("rm", "--sft-data"), ("ppo", "--prompts")], ids=["sft", "rm", "ppo"]
)
def test_bad_data_creates_no_run_directory(command, flag, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "fine", "response": "fine"}\n{"prompt": \n')
    output = tmp_path / "run"
    extra = ["--reward-model", "none", "--reward-fn", "ppo_rewards:constant"] if command == "ppo" else []
    assert main([command, "--output", str(output), flag, str(bad), *extra]) == 2
    assert f"{bad}:2: " in capsys.readouterr().err
    assert not output.exists(), "nothing is written before the inputs are read"


def test_lora_ppo_scored_by_a_reward_model_resumes_bit_identical(tmp_path, monkeypatch):
    """The modes the SIGTERM test leaves out: LoRA adapters (policy and critic) and a reward model's
    scores (with the critic calibrated from it at the first rollout)."""
    from test_ppo import _saved_reward_model
    from trainer_runs import crash_after_checkpoint

    _saved_reward_model(tmp_path / "rm")
    flags = {
        **{k: v for k, v in PPO_RULE.items() if k not in ("reward_model", "reward_fn", "reward_fn_weight")},
        "reward_model": str(tmp_path / "rm"),
        "actor_critic": "lora",
        "lora_r": 4,
        "steps": 4,
        "save_every": 2,
    }
    run_ppo(tmp_path / "whole", **flags)
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_ppo(tmp_path / "stopped", **flags)
    monkeypatch.undo()
    run_ppo(tmp_path / "stopped", resume=True, **flags)
    expected, final = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert expected.keys() == final.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def test_max_line_mib_flag_limits_every_reader(tmp_path, monkeypatch, capsys):
    from fastrlhf.data import readers

    monkeypatch.setattr(readers, "_max_line_bytes", readers.max_line_bytes())  # restored afterwards
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "short"}\n' + '{"prompt": "' + "x" * 300 + '"}\n', encoding="utf-8")
    argv = ["data", "--data", str(data), "--kind", "ppo", "--output", str(tmp_path / "out")]
    assert main([*argv, "--max-line-mib", str(200 / 2**20)]) == 2
    assert f"{data}:2: line longer than 200 bytes" in capsys.readouterr().err
    assert main([*argv, "--max-line-mib", "0"]) == 2
    assert "max_line_mib" in capsys.readouterr().err
    assert main(argv) == 0, "the default limit (64 MiB) reads the file"
