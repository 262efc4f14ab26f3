"""Guards that keep a run from training on, or saving, numbers that are not numbers.

A single NaN loss or infinite gradient, stepped into the weights, poisons every later step, and the
checkpoints and the final model then carry it. ``NonFiniteGuard`` checks each optimizer step's loss and
gradient norm before the step: a non-finite one is skipped (the gradients dropped, the skip logged and
counted); ``--max-nonfinite-steps`` skips in a row stop the run with ``NonFiniteError``, since a run that
keeps producing them has diverged. ``check_finite_parameters`` runs before anything is saved.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The run produced non-finite losses or gradients too often in a row, or non-finite weights."""


class NonFiniteGuard:
    """Per optimizer step: ``finite = guard.step_is_finite(step, losses, grad_norm)``; step only when True.

    Every process reaches the same verdict (one all-reduce of a flag), so under DDP no process steps its
    optimizer while another skips, which would silently split the replicas' weights.
    """

    def __init__(self, accelerator, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_consecutive}")
        self.accelerator = accelerator
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def step_is_finite(self, step: int, losses: list[torch.Tensor], grad_norm) -> bool:
        """``losses``: the micro-batch losses behind this optimizer step (scalars); ``grad_norm``: the
        total gradient norm (a tensor or float; None when gradients are not checked, as under an fp16
        gradient scaler, which skips such steps itself)."""
        bad = any(not bool(torch.isfinite(loss.detach()).all()) for loss in losses)
        if grad_norm is not None:
            bad = bad or not math.isfinite(float(grad_norm))
        flag = torch.tensor([float(bad)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if float(flag) == 0:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        log.warning(
            "step %d: non-finite loss or gradient norm (%s); the optimizer step is skipped (%d in a row, "
            "%d in all)",
            step,
            "grad norm " + str(float(grad_norm)) if grad_norm is not None else "loss",
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss or "
                f"gradient norm (--max-nonfinite-steps {self.max_consecutive}); the run has diverged. "
                "Lower --learning-rate, set --max-grad-norm, or use bf16 instead of fp16; the last "
                "checkpoint holds finite weights"
            )
        return False

    def state(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))


def clip_and_check(
    accelerator, model, max_grad_norm: float, guard: NonFiniteGuard | None, step: int, losses: list
) -> tuple[bool, float]:
    """At an optimizer step: clip the gradient norm to ``max_grad_norm`` (0: only measure it) and ask
    ``guard`` (None: no guard) whether the step is finite. Returns ``(finite, grad norm)``."""
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    if guard is None:
        return True, grad_norm
    # An fp16 gradient scaler skips overflowing steps itself and lowers its scale; count only losses.
    checked = None if accelerator.scaler is not None else grad_norm
    return guard.step_is_finite(step, losses, checked), grad_norm


def check_finite_parameters(model: torch.nn.Module, what: str, accelerator=None) -> None:
    """Raise ``NonFiniteError`` naming the first parameter of ``model`` holding a NaN or inf; ``what``
    says what was about to be written (a checkpoint, the final model).

    Sharded parameters (FSDP2 DTensors) are checked shard by shard, without a collective per parameter.
    With ``accelerator`` given, every process must call it, and all raise together when any shard is
    bad: a process raising alone would leave the others waiting in the save's collectives."""
    from fastrlhf.train.sharding import local_tensor

    bad = next(
        (
            name
            for name, parameter in model.named_parameters()
            if not bool(torch.isfinite(local_tensor(parameter.detach())).all())
        ),
        None,
    )
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(bad is not None)], device=accelerator.device)
        if float(accelerator.reduce(flag, reduction="sum")) > 0 and bad is None:
            bad = "(a shard on another process)"
    if bad is not None:
        raise NonFiniteError(f"{what}: parameter {bad} holds non-finite values; refusing to save it")
