"""Trainer configs: dataclasses parsed from CLI flags, optionally seeded from a YAML file.

Every dataclass field becomes a ``--flag`` (``--learning-rate`` and ``--learning_rate`` both work)
through transformers' ``HfArgumentParser``; its ``metadata["help"]`` is the ``--help`` text, and a
field without one is a TypeError, so no option ships undocumented. ``--config run.yaml`` supplies
values first and explicit flags override them. The YAML is checked key by key against the dataclass:
an unknown key or a value of the wrong type is an error naming the file and the key, never a silently
ignored or mis-typed setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from fastrlhf.errors import InputError
from fastrlhf.train.io import atomic_write_text

__all__ = ["ConfigError", "load_yaml_values", "parse_config", "save_resolved_config"]

ConfigT = TypeVar("ConfigT")

CONFIG_FILE_NAME = "config.yaml"


class ConfigError(InputError):
    """A YAML config that does not fit its dataclass: unknown key, wrong type, bad layout."""


def parse_config(config_cls: type[ConfigT], argv: list[str] | None, prog: str) -> ConfigT:
    """Parse ``argv`` (``sys.argv[1:]`` when None) into an instance of the dataclass ``config_cls``.

    Precedence, lowest first: the dataclass defaults, the ``--config`` YAML file, explicit flags.
    ``--help`` prints every field's help text and exits. Raises TypeError if a field lacks help text,
    ConfigError for a bad YAML file, and exits with argparse's usage error for bad flags.
    """
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"parse_config needs a dataclass type, got {config_cls!r}")
    fields = _init_fields(config_cls)
    _require_help(config_cls, fields)
    if "config" in fields:
        raise TypeError(
            f"{config_cls.__name__} may not have a field named 'config': --config is the YAML file"
        )
    argv = sys.argv[1:] if argv is None else list(argv)

    # allow_abbrev=False: with prefix matching, adding a flag later could silently change what an
    # abbreviation in someone's script means.
    parser = HfArgumentParser(config_cls, prog=prog, allow_abbrev=False)
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        metavar="PATH.yaml",
        help="YAML file of option values (keys are option names, '-' or '_'); explicit flags override it",
    )
    # Read --config before the full parse so that its values become the parser's defaults, which is
    # exactly "explicit flags win" without re-implementing argparse's precedence.
    pre = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    pre.add_argument("--config", type=str, default=None)
    config_path = pre.parse_known_args(argv)[0].config
    if config_path is not None:
        values = load_yaml_values(config_cls, config_path)
        parser.set_defaults(**values)
        for action in parser._actions:  # argparse has no public way to satisfy a required flag by default
            if action.dest in values:
                action.required = False

    # look_for_args_file=False: HfArgumentParser would otherwise read "<script>.args" next to sys.argv[0].
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except InputError:
        raise
    except ValueError as error:  # a config's own checks (__post_init__): a bad flag value
        raise ConfigError(str(error)) from error
    return parsed[0]


def load_yaml_values(config_cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping and check it against ``config_cls``: ``{field_name: typed value}``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:  # an empty file sets nothing
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(raw).__name__}")

    fields = _init_fields(config_cls)
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} for {config_cls.__name__}{hint}")
        if name in values:
            raise ConfigError(f"{path}: key {key!r} is given twice (once with '-', once with '_')")
        try:
            values[name] = _coerce(value, hints[name])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: key {key!r}: {err}") from None
    return values


def save_resolved_config(config: Any, run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/config.yaml`` atomically: every field's final value, in field order.

    ``parse_config(cls, ["--config", str(path)], prog)`` on that file rebuilds an equal config,
    which is how a run is reproduced.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"save_resolved_config needs a dataclass instance, got {config!r}")
    values = {name: _plain(getattr(config, name)) for name in _init_fields(type(config))}
    header = f"# Resolved {type(config).__name__} of this run. Reproduce it with: --config <this file>\n"
    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return atomic_write_text(Path(run_dir) / CONFIG_FILE_NAME, header + body)


def _init_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    # Fields with init=False are computed, not configured, and HfArgumentParser skips them too.
    return {f.name: f for f in dataclasses.fields(config_cls) if f.init}


def _require_help(config_cls: type, fields: dict[str, dataclasses.Field]) -> None:
    for name, f in fields.items():
        text = f.metadata.get("help")
        if not isinstance(text, str) or not text.strip():
            raise TypeError(
                f"{config_cls.__name__}.{name} has no help text: declare it as "
                f'field(default=..., metadata={{"help": "..."}}) so that --help documents it'
            )


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or TypeError/ValueError saying what was expected.

    Strict on purpose: a YAML ``lr: "fast"`` or ``steps: 1.5`` is a mistake to report, not to guess at.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(" and ".join(errors) + (" (or null)" if type(None) in args else ""))
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {_describe(value)}")
        item_type = args[0] if args else Any
        return [_coerce(item, item_type) for item in value]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(f"expected a number, got {_describe(value)}")
        if isinstance(value, int | float):
            return float(value)
        # PyYAML follows YAML 1.1, where "1e-5" (no dot) is a string, not a float; accept that spelling.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {_describe(value)}")
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string (quote it), got {_describe(value)}")
        return value
    if isinstance(tp, type) and issubclass(tp, os.PathLike):
        if not isinstance(value, str):
            raise TypeError(f"expected a path string, got {_describe(value)}")
        return tp(value)
    raise TypeError(f"fields of type {tp!r} cannot be set from YAML")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _plain(value: Any) -> Any:
    """A field value as the plain YAML type that ``_coerce`` turns back into it."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
