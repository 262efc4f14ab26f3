"""Flags the trainers share: the run directory, the optimisation, batching and checkpointing.

``RunArguments`` is what every run has (SFT, RM and PPO); ``TrainArguments`` adds what the supervised
trainers (SFT, RM) have: a model, epochs over a dataset, batching and held-out evaluation. Each trainer's
config dataclass inherits one of them (and ``ModelOptions``), so every ``--help`` lists one consistent set.
Every field carries its help text.
"""

from __future__ import annotations

import dataclasses

from fastrlhf.errors import InputError
from fastrlhf.models.loading import ModelOptions

OPTIMIZERS = ("auto", "adamw8bit", "paged_adamw8bit", "adamw")


def flag(default, help: str, **kwargs):
    """A dataclass field with its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _check_at_least(config, minimum: int | float, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise InputError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


@dataclasses.dataclass
class InputOptions:
    """What every command that reads JSONL data takes."""

    max_line_mib: float = flag(
        64.0,
        "Longest JSONL line a data file may hold, in MiB: a longer one is an error at its file:line, "
        "found without reading the line whole.",
    )


@dataclasses.dataclass
class RunArguments(ModelOptions, InputOptions):
    output: str | None = flag(
        None, "Run directory (created; holds config, metrics, checkpoints, plots, model)."
    )
    gradient_accumulation_steps: int = flag(1, "Micro-batches per optimizer step.")
    learning_rate: float = flag(1e-4, "Peak learning rate.")
    weight_decay: float = flag(0.0, "AdamW weight decay (not applied to biases and norms).")
    optimizer: str = flag(
        "auto",
        "auto (adamw8bit on a GPU, adamw on CPU, where bitsandbytes' step is slow), adamw8bit "
        "(bitsandbytes), paged_adamw8bit, or adamw (torch).",
    )
    warmup_steps: int = flag(0, "Linear warmup steps before the cosine decay.")
    final_lr_fraction: float = flag(
        0.1, "The cosine decay ends at this fraction of the peak LR (the paper: 0.1)."
    )
    max_grad_norm: float = flag(1.0, "Clip the gradient norm to this; 0 disables clipping.")
    max_nonfinite_steps: int = flag(
        5,
        "An optimizer step whose loss or gradient norm is NaN/inf is skipped; this many in a row stop "
        "the run (it has diverged).",
    )
    save_every: int = flag(
        0, "Write a resumable checkpoint every N steps (0: at each epoch end; PPO: at the end)."
    )
    keep_checkpoints: int = flag(2, "How many checkpoints to keep.")
    resume: bool = flag(False, "Continue from the last checkpoint in --output.")
    seed: int = flag(0, "Seed for initialisation, shuffling, dropout and sampling.")
    mixed_precision: str = flag("no", "Accelerate mixed precision: no, bf16 or fp16.")
    report_to: str = flag(
        "none", "Extra trackers through accelerate: none, tensorboard, wandb (comma-separated)."
    )
    log_every: int = flag(1, "Log training metrics every N optimizer steps.")
    plots: bool = flag(
        True,
        "Write PNG plots of metrics.jsonl into --output when the run ends (false: skip them, and "
        "matplotlib's import; about 2-3 s a run on a 2-core CPU).",
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.output:
            raise InputError("output: a run directory is required (--output DIR)")
        _check_at_least(
            self, 1, ("gradient_accumulation_steps", "keep_checkpoints", "log_every", "max_nonfinite_steps")
        )
        _check_at_least(self, 0, ("warmup_steps", "save_every", "max_grad_norm", "weight_decay"))
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 < self.final_lr_fraction <= 1.0:
            raise InputError(f"final_lr_fraction must be in (0, 1], got {self.final_lr_fraction}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"mixed_precision: expected no, bf16 or fp16, got {self.mixed_precision!r}")


@dataclasses.dataclass
class TrainArguments(RunArguments):
    model: str = flag("tiny", "A local Hugging Face model directory, or 'tiny' (built locally, no download).")
    epochs: int = flag(1, "Passes over the training data.")
    batch_size: int = flag(16, "Examples per micro-batch on each process.")
    max_steps: int = flag(0, "Stop after this many optimizer steps (0: run all epochs).")
    max_prompt_tokens: int = flag(
        256, "Prompts longer than this keep their last tokens (counted in the summary)."
    )
    max_response_tokens: int = flag(256, "Responses longer than this keep their first tokens (counted).")
    packing: str = flag("auto", "Padding-free packing: auto (with flash_attention_2), on, or off.")
    group_by_length: bool = flag(True, "Batch examples of similar length together to cut padding.")
    validation_fraction: float = flag(
        0.1, "Held-out fraction, split by user id, when --eval-data is not given."
    )
    eval_every: int = flag(0, "Evaluate every N optimizer steps (0: at the end of each epoch).")

    def __post_init__(self):
        super().__post_init__()
        _check_at_least(self, 1, ("epochs", "batch_size", "max_prompt_tokens", "max_response_tokens"))
        _check_at_least(self, 0, ("eval_every", "max_steps"))
        if self.packing not in ("auto", "on", "off"):
            raise InputError(f"packing: expected auto, on or off, got {self.packing!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise InputError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
