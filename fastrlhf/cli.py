"""``fastrlhf <command> [flags]``: the command line of the trainer (see DESIGN.md, "CLI contract").

Every command's flags come from a config dataclass; ``--config run.yaml`` supplies them from YAML, and
``fastrlhf <command> --help`` explains each one. Errors in inputs (a bad JSONL line, a missing model
directory, an invalid flag value) print one clear line and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its config dataclass and its run function, both as
    ``"module:name"`` and imported only when the command runs (``fastrlhf --help`` imports no torch).

    ``run(config)`` returns what the command prints: a dict (as JSON), any other value, or None (nothing:
    the pipeline prints its own table)."""

    help: str
    config: str
    run: str

    def config_class(self):
        return _load(self.config)

    def run_function(self):
        return _load(self.run)


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


COMMANDS = {
    "sft": Command(
        "Step 1: supervised fine-tuning on prompt -> demonstration.",
        "fastrlhf.train.sft:SFTConfig",
        "fastrlhf.train.sft:train_sft",
    ),
    "rm": Command(
        "Step 2: reward model on K ranked responses per prompt.",
        "fastrlhf.train.rm:RMConfig",
        "fastrlhf.train.rm:train_rm",
    ),
    "ppo": Command(
        "Step 3: PPO against the reward model, KL penalty to the SFT policy, optional PPO-ptx.",
        "fastrlhf.train.ppo:PPOConfig",
        "fastrlhf.train.ppo:train_ppo",
    ),
    "pipeline": Command(
        "SFT -> RM -> PPO (and PPO-ptx) on tiny and the bundled data, with a summary table.",
        "fastrlhf.train.pipeline:PipelineConfig",
        "fastrlhf.train.pipeline:run_pipeline_command",
    ),
    "generate": Command(
        "Sample responses to prompts with a model.",
        "fastrlhf.commands:GenerateConfig",
        "fastrlhf.commands:run_generate",
    ),
    "label": Command(
        "Rank K sampled responses per prompt with a labeler function, into the RM's format.",
        "fastrlhf.commands:LabelConfig",
        "fastrlhf.commands:run_label",
    ),
    "score": Command(
        'Add a reward model\'s "reward" to {prompt, response} lines.',
        "fastrlhf.commands:ScoreConfig",
        "fastrlhf.commands:run_score",
    ),
    "data": Command(
        "Dataset hygiene: prefix dedupe, per-user cap, user-disjoint split, tokenisation report.",
        "fastrlhf.commands:DataConfig",
        "fastrlhf.commands:run_data",
    ),
}


def _usage() -> str:
    lines = ["usage: fastrlhf <command> [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<9} {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


# Exit codes (docs/reliability.md); 1 is an internal error, with its traceback; 128 + N a signal N.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # the loss or gradients stayed non-finite (--max-nonfinite-steps)
EXIT_OS_ERROR = 4
EXIT_OUT_OF_MEMORY = 5
OOM_ADVICE = (
    "lower --batch-size (sft, rm), --rollout-batch-size, --minibatch-size or raise "
    "--gradient-accumulation-steps (ppo), or --max-new-tokens; --gradient-checkpointing true and "
    "--actor-critic shared or lora hold less"
)


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    text = str(error)
    return isinstance(error, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastrlhf: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from fastrlhf.data.readers import set_max_line_mib
    from fastrlhf.errors import InputError
    from fastrlhf.train.config import parse_config
    from fastrlhf.train.guards import NonFiniteError
    from fastrlhf.train.signals import RunInterrupted

    try:
        entry = COMMANDS[command]
        config = parse_config(entry.config_class(), rest, prog=f"fastrlhf {command}")
        set_max_line_mib(config.max_line_mib)  # one limit for every reader this command runs
        result = entry.run_function()(config)
    except RunInterrupted as stop:  # SIGTERM/SIGINT: a checkpoint was written first
        print(f"fastrlhf {command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except NonFiniteError as error:  # diverged: no NaN weights were saved
        print(f"fastrlhf {command}: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except InputError as error:  # bad input: flag values, config files, data lines, paths, models
        if os.environ.get("FASTRLHF_DEBUG"):
            raise
        print(f"fastrlhf {command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the disk or the file system: unwritable --output, ENOSPC, a vanished file
        if os.environ.get("FASTRLHF_DEBUG"):
            raise
        where = f" {error.filename}" if error.filename else ""
        print(
            f"fastrlhf {command}: error: cannot read or write{where}: {error.strerror or error}",
            file=sys.stderr,
        )
        return EXIT_OS_ERROR
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as error:
        # torch's CPU allocator reports a failed allocation as a plain RuntimeError.
        if isinstance(error, RuntimeError) and not _is_out_of_memory(error):
            raise
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        print(f"fastrlhf {command}: error: out of memory ({first_line}); {OOM_ADVICE}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    if os.environ.get("RANK", "0") != "0":  # under a multi-process launch, only rank 0 prints the result
        return 0
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    elif result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
