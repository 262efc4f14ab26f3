"""fastrlhf.train.config: dataclass flags with help text, YAML --config, precedence, round trip."""

import dataclasses
import shlex
from pathlib import Path
from typing import Literal

import pytest

from fastrlhf.train.config import ConfigError, parse_config, save_resolved_config


def _flag(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ToyConfig:
    model: str = dataclasses.field(metadata={"help": "Model directory to train."})
    learning_rate: float = _flag(1e-4, "Peak learning rate of the cosine schedule.")
    steps: int = _flag(10, "Optimizer steps to run.")
    shuffle: bool = _flag(True, "Shuffle the training data each epoch.")
    precision: Literal["no", "bf16"] = _flag("no", "Mixed precision mode.")
    eval_every: int | None = _flag(None, "Evaluate every N steps.")
    output: Path | None = _flag(None, "Run directory.")
    tags: list[str] = dataclasses.field(default_factory=list, metadata={"help": "Free-form run tags."})


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_help_lists_every_field_with_its_text(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ToyConfig, ["--help"], prog="toy")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: toy")
    for field in dataclasses.fields(ToyConfig):
        assert field.metadata["help"] in " ".join(out.split())  # argparse re-wraps long help lines
    assert "--learning-rate" in out and "--config" in out


def test_field_without_help_is_a_type_error_naming_it():
    @dataclasses.dataclass
    class Undocumented:
        documented: int = _flag(1, "Has help.")
        bare: int = 2

    with pytest.raises(TypeError, match=r"Undocumented\.bare has no help text"):
        parse_config(Undocumented, [], prog="x")


def test_field_named_config_is_refused():
    @dataclasses.dataclass
    class Clashing:
        config: str = _flag("x", "Would shadow --config.")

    with pytest.raises(TypeError, match="may not have a field named 'config'"):
        parse_config(Clashing, [], prog="x")


def test_flags_alone_and_defaults():
    config = parse_config(ToyConfig, ["--model", "m", "--learning-rate", "3e-5", "--no-shuffle"], prog="t")
    assert config == ToyConfig(model="m", learning_rate=3e-5, shuffle=False)


def test_yaml_values_then_explicit_flags_override(tmp_path):
    path = write_yaml(
        tmp_path,
        "model: from-yaml\nlearning-rate: 1e-5\nsteps: 7\nshuffle: false\nprecision: bf16\ntags: [a, b]\n",
    )
    config = parse_config(ToyConfig, ["--config", str(path), "--steps", "3", "--precision", "no"], prog="t")
    assert config.model == "from-yaml"  # a required flag satisfied by the YAML
    assert config.learning_rate == 1e-5  # YAML 1.1 reads "1e-5" as a string; it still means a float
    assert isinstance(config.learning_rate, float)
    assert config.shuffle is False
    assert config.tags == ["a", "b"]
    assert config.steps == 3 and config.precision == "no"  # flags win over the YAML
    assert config.eval_every is None  # untouched: the dataclass default


def test_flag_order_does_not_matter_for_precedence(tmp_path):
    path = write_yaml(tmp_path, "model: m\nsteps: 7\n")
    config = parse_config(ToyConfig, ["--steps", "2", "--config", str(path)], prog="t")
    assert config.steps == 2


def test_unknown_yaml_key_names_file_key_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, "model: m\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        parse_config(ToyConfig, ["--config", str(path)], prog="t")
    message = str(err.value)
    assert str(path) in message and "'learning_rat'" in message
    assert "did you mean 'learning_rate'" in message


@pytest.mark.parametrize(
    "line, expected",
    [
        ("steps: 1.5", "expected an integer, got float 1.5"),
        ("steps: true", "expected an integer, got bool True"),
        ("learning_rate: fast", "expected a number, got str 'fast'"),
        ("shuffle: 1", "expected true or false, got int 1"),
        ("model: 123", "expected a string (quote it), got int 123"),
        ("precision: fp8", "expected one of ['no', 'bf16'], got 'fp8'"),
        ("tags: a", "expected a list, got str 'a'"),
        ("eval_every: often", "expected an integer, got str 'often' (or null)"),
    ],
)
def test_wrong_yaml_type_names_file_and_key(tmp_path, line, expected):
    path = write_yaml(tmp_path, f"model: m\n{line}\n")
    key = line.split(":")[0]
    with pytest.raises(ConfigError) as err:
        parse_config(ToyConfig, ["--config", str(path)], prog="t")
    assert str(err.value) == f"{path}: key {key!r}: {expected}"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("- a\n- b\n", "expected a mapping of option names to values, got list"),
        ("model: m\nsteps: [1\n", "not valid YAML"),
    ],
)
def test_bad_yaml_layout(tmp_path, text, problem):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=problem):
        parse_config(ToyConfig, ["--config", str(path)], prog="t")


def test_dash_and_underscore_spellings_of_one_key_conflict(tmp_path):
    path = write_yaml(tmp_path, "model: m\nlearning-rate: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="'learning_rate' is given twice"):
        parse_config(ToyConfig, ["--config", str(path)], prog="t")


def test_missing_config_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse_config(ToyConfig, ["--config", str(tmp_path / "absent.yaml")], prog="t")


def test_empty_yaml_sets_nothing(tmp_path):
    path = write_yaml(tmp_path, "# nothing here\n")
    assert parse_config(ToyConfig, ["--config", str(path), "--model", "m"], prog="t") == ToyConfig(model="m")


def test_saved_resolved_config_reproduces_the_run(tmp_path):
    original = parse_config(
        ToyConfig,
        shlex.split("--model m --learning-rate 2.5e-6 --steps 4 --no-shuffle --precision bf16 --eval-every 2")
        + ["--output", str(tmp_path / "out"), "--tags", "x", "y"],
        prog="t",
    )
    path = save_resolved_config(original, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Resolved ToyConfig")
    # fields in declaration order, so the file reads like --help
    positions = [text.index(f"\n{f.name}:") for f in dataclasses.fields(ToyConfig)]
    assert positions == sorted(positions)
    assert parse_config(ToyConfig, ["--config", str(path)], prog="t") == original


def test_save_resolved_config_rejects_non_dataclass(tmp_path):
    with pytest.raises(TypeError):
        save_resolved_config({"model": "m"}, tmp_path)
