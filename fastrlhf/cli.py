"""``fastrlhf <command> [flags]``: the command line of the trainer (see DESIGN.md, "CLI contract").

Every command's flags come from a config dataclass; ``--config run.yaml`` supplies them from YAML, and
``fastrlhf <command> --help`` explains each one. Errors in inputs (a bad JSONL line, a missing model
directory, an invalid flag value) print one clear line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

COMMANDS = {
    "sft": "Step 1: supervised fine-tuning on prompt -> demonstration.",
    "rm": "Step 2: reward model on K ranked responses per prompt.",
    "ppo": "Step 3: PPO against the reward model, KL penalty to the SFT policy, optional PPO-ptx.",
    "pipeline": "SFT -> RM -> PPO (and PPO-ptx) on tiny and the bundled data, with a summary table.",
    "generate": "Sample responses to prompts with a model.",
    "label": "Rank K sampled responses per prompt with a labeler function, into the RM's format.",
    "score": 'Add a reward model\'s "reward" to {prompt, response} lines.',
    "data": "Dataset hygiene: prefix dedupe, per-user cap, user-disjoint split, tokenisation report.",
}


def _usage() -> str:
    lines = ["usage: fastrlhf <command> [--help] [flags]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _config_class(command: str):
    if command == "sft":
        from fastrlhf.train.sft import SFTConfig

        return SFTConfig
    if command == "rm":
        from fastrlhf.train.rm import RMConfig

        return RMConfig
    if command == "ppo":
        from fastrlhf.train.ppo import PPOConfig

        return PPOConfig
    if command == "pipeline":
        from fastrlhf.train.pipeline import PipelineConfig

        return PipelineConfig
    from fastrlhf import commands

    return {
        "generate": commands.GenerateConfig,
        "label": commands.LabelConfig,
        "score": commands.ScoreConfig,
        "data": commands.DataConfig,
    }[command]


def _run(command: str, config):
    if command == "sft":
        from fastrlhf.train.sft import train_sft

        return train_sft(config)
    if command == "rm":
        from fastrlhf.train.rm import train_rm

        return train_rm(config)
    if command == "ppo":
        from fastrlhf.train.ppo import train_ppo

        return train_ppo(config)
    if command == "pipeline":
        from fastrlhf.train.pipeline import run_pipeline

        run_pipeline(config)  # prints its table; the stages' summaries are in the run directory
        return None
    from fastrlhf import commands

    return {
        "generate": commands.run_generate,
        "label": commands.run_label,
        "score": commands.run_score,
        "data": commands.run_data,
    }[command](config)


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
        config = parse_config(_config_class(command), rest, prog=f"fastrlhf {command}")
        set_max_line_mib(config.max_line_mib)  # one limit for every reader this command runs
        result = _run(command, config)
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
