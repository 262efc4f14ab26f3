"""The ``fastrlhf`` command line: help, YAML config, bad input, generate -> score, and ``data``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from trainer_runs import read_lines, run_rm, run_sft

from fastrlhf.cli import COMMANDS, main
from fastrlhf.data import synthetic


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fastrlhf", *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained SFT model and a reward model on top of it (enough to round-trip, not to be good)."""
    root = tmp_path_factory.mktemp("cli")
    run_sft(root / "sft", max_steps=8)
    run_rm(root / "rm", model=root / "sft" / "model", max_steps=6)
    return root


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(COMMANDS[command].config_class()):
        assert f"--{field.name}" in text or f"--{field.name.replace('_', '-')}" in text, field.name
        assert field.metadata["help"].split()[0] in text, f"{command} --{field.name}: help text not shown"


def test_top_level_help_and_import_fastrlhf_load_no_torch():
    """``fastrlhf --help`` lists the commands without importing torch (0.1 s instead of 5 s), and
    ``fastrlhf.ops`` still resolves on first use after a bare ``import fastrlhf``."""
    script = (
        "import sys, fastrlhf, fastrlhf.cli\n"
        "assert fastrlhf.cli.main(['--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert callable(fastrlhf.ops.gather_logprobs) and 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(name in result.stdout for name in COMMANDS)


def test_a_cpu_run_loads_no_compiler():
    """A PPO process that calls ops on the CPU imports neither torch's compiler (dynamo, inductor, sympy:
    ~150 MiB resident, 2.5 s) nor, without a GPU or the interpreter, triton: the ops mark their backend
    queries constant for ``torch.compile`` without importing it."""
    script = (
        "import sys, torch\n"
        "import fastrlhf.train.ppo\n"
        "from fastrlhf import ops\n"
        "x = torch.randn(3, 11, requires_grad=True)\n"
        "ops.gather_logprobs(x, torch.tensor([1, 2, 3])).sum().backward()\n"
        "loaded = [m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules]\n"
        "if not torch.cuda.is_available() and 'triton' in sys.modules:\n"
        "    loaded.append('triton')\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_unknown_command_is_an_error(capsys):
    assert main(["train-everything"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bad_data_line_names_file_line_and_problem(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hi"\n')
    assert main(["sft", "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and "JSON" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_ranking_line_is_reported(tmp_path, capsys):
    data = tmp_path / "rm.jsonl"
    line = {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b", "ranking": "first"}]}
    data.write_text(json.dumps(line) + "\n")
    assert main(["rm", "--data", str(data), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1:" in err and "ranking" in err


def test_invalid_flag_value_is_a_clear_error(tmp_path, capsys):
    assert main(["sft", "--output", str(tmp_path / "r"), "--optimizer", "sgd"]) == 2
    assert "optimizer" in capsys.readouterr().err


def test_missing_model_directory_says_there_is_no_hub(tmp_path, capsys):
    assert main(["sft", "--output", str(tmp_path / "r"), "--model", "org/some-model"]) == 2
    assert "no hub" in capsys.readouterr().err


def test_yaml_config_supplies_flags_and_flags_override(tmp_path, monkeypatch):
    from fastrlhf.train.config import parse_config
    from fastrlhf.train.sft import SFTConfig

    config_file = tmp_path / "sft.yaml"
    config_file.write_text("learning_rate: 0.0005\nepochs: 3\nlora-r: 4\n")
    config = parse_config(
        SFTConfig, ["--config", str(config_file), "--output", "x", "--epochs", "5"], prog="t"
    )
    assert (config.learning_rate, config.epochs, config.lora_r) == (0.0005, 5, 4)


def test_generate_then_score_round_trips(trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = synthetic.prompts(7, seed=99)
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generated, scored = tmp_path / "generated.jsonl", tmp_path / "scored.jsonl"
    greedy_generate = ["generate", "--model", str(trained / "sft"), "--prompts", str(prompts)]
    greedy_generate += ["--max-new-tokens", "12", "--temperature", "0"]
    cli(*greedy_generate, "--output", str(generated))
    lines = read_lines(generated)
    assert [line["prompt"] for line in lines] == [r["prompt"] for r in rows]
    assert all(isinstance(line["response"], str) for line in lines)

    cli("score", "--reward-model", str(trained / "rm"), "--data", str(generated), "--output", str(scored))
    scored_lines = read_lines(scored)
    assert [(s["prompt"], s["response"]) for s in scored_lines] == [
        (g["prompt"], g["response"]) for g in lines
    ]
    rewards = [s["reward"] for s in scored_lines]
    assert all(isinstance(r, float) and r == r for r in rewards)

    # The CLI's rewards are the reward model's scores of exactly these texts, bias included.
    from fastrlhf.data import read_jsonl
    from fastrlhf.data.tokenize import TruncationPolicy
    from fastrlhf.inference.score import score_pairs
    from fastrlhf.models.loading import load_tokenizer
    from fastrlhf.models.reward_model import RewardModel

    model_dir = str(trained / "rm" / "model")
    expected = score_pairs(
        RewardModel.from_pretrained(model_dir),
        load_tokenizer(model_dir),
        read_jsonl(generated, "sft"),
        TruncationPolicy(),
    )
    assert rewards == pytest.approx(expected, abs=1e-5)

    # Greedy generation is deterministic: a second run, in this process, writes the same file.
    again = tmp_path / "again.jsonl"
    assert main([*greedy_generate, "--output", str(again)]) == 0
    assert again.read_text() == generated.read_text()


def test_score_refuses_a_model_without_a_reward_head(trained, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    argv = ["score", "--reward-model", str(trained / "sft"), "--data", str(data)]
    assert main([*argv, "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_data_subcommand_dedupes_caps_and_splits_by_user(tmp_path):
    rows = [
        {
            "prompt": "Tell me about the moon and its phases " + "x" * 200 + " one",
            "response": "r1",
            "user": "a",
        },
        {
            "prompt": "Tell me about the moon and its phases " + "x" * 200 + " two",
            "response": "r2",
            "user": "b",
        },
    ]
    rows += [{"prompt": f"question {i}", "response": f"answer {i}", "user": "heavy"} for i in range(30)]
    rows += [{"prompt": f"other {i}", "response": f"reply {i}", "user": f"u{i}"} for i in range(40)]
    data = tmp_path / "raw.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean"
    result = cli(
        "data",
        "--data",
        str(data),
        "--kind",
        "sft",
        "--output",
        str(out),
        "--max-per-user",
        "10",
        "--validation-fraction",
        "0.25",
        "--model",
        "tiny",
    )
    report = json.loads((out / "report.json").read_text())
    assert json.loads(result.stdout)["read"] == report["read"] == len(rows)
    assert report["duplicates_dropped"] == 1
    assert report["over_user_cap_dropped"] == 20
    train, validation = read_lines(out / "train.jsonl"), read_lines(out / "validation.jsonl")
    assert len(train) + len(validation) == len(rows) - 21
    assert not {r["user"] for r in train} & {r["user"] for r in validation}, "the split is by user"
    # Kept lines are written back unchanged.
    assert all(r in rows for r in train + validation)
    assert 0.0 <= report["padding_fraction"]["length_grouped"] <= report["padding_fraction"]["file_order"]
    assert report["tokenization"]["examples"] == len(train)
