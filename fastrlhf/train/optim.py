"""Optimizers and the learning-rate schedule the trainers share.

The default (``auto``) is bitsandbytes' 8-bit AdamW on a GPU: its two moment buffers take one byte per
parameter each instead of four, which is most of the optimizer memory of full fine-tuning. On CPU,
``auto`` is torch's AdamW: bitsandbytes' 8-bit step runs there too, but measured 5.5x slower than
torch's (43 vs 7.8 ms per step for the 1M-parameter tiny model, AMD EPYC, 1 thread), which is a third of
a tiny SFT run; ``--optimizer adamw8bit`` still picks it.
The schedule is InstructGPT's: optional linear warmup, then cosine decay to 10% of the peak LR.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastrlhf.errors import InputError

__all__ = ["OPTIMIZER_NAMES", "build_optimizer", "build_scheduler", "param_groups"]

log = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("auto", "adamw8bit", "paged_adamw8bit", "adamw")


def build_optimizer(
    params_or_groups: Iterable[Any],
    name: str = "auto",
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params_or_groups`` (tensors, or dicts as from ``param_groups``).

    - ``auto``: ``adamw8bit`` when a CUDA device is present (the trainers then train on it), else ``adamw``.
    - ``adamw8bit``: ``bitsandbytes.optim.AdamW8bit``. Tensors under 4096 elements keep
      32-bit state, as bitsandbytes decides, since quantising them saves nothing.
    - ``paged_adamw8bit``: ``bitsandbytes.optim.PagedAdamW8bit``, whose state can be evicted to host
      memory under GPU memory pressure. Paging needs CUDA; without it this is ``adamw8bit``.
    - ``adamw``: ``torch.optim.AdamW``.

    ``weight_decay`` applies to groups that do not set their own. Betas default to InstructGPT's.
    """
    if name not in OPTIMIZER_NAMES:
        raise InputError(f"optimizer: unknown name {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    kwargs = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}
    if name == "auto":  # the trainers train on the GPU whenever there is one
        name = "adamw8bit" if torch.cuda.is_available() else "adamw"
    if name == "adamw":
        # fused: one kernel per tensor that reads each parameter, gradient and moment once and allocates
        # nothing. torch defaults to it nowhere; its foreach form builds whole-model temporaries (sqrt of
        # the second moment and more), and its per-tensor loop is slower still. 27M fp32 parameters
        # (104 MiB), 2-core EPYC: fused 24 ms and 0 MiB of transient memory, foreach 93 ms and 104 MiB,
        # per-tensor loop 123 ms and 93 MiB.
        return torch.optim.AdamW(params_or_groups, fused=True, **kwargs)

    bnb_optim = _import_bnb_optim(name)
    if name == "adamw8bit":
        return bnb_optim.AdamW8bit(params_or_groups, **kwargs)
    optimizer = bnb_optim.PagedAdamW8bit(params_or_groups, **kwargs)
    if not torch.cuda.is_available():
        log.info(
            "paged_adamw8bit: no CUDA device, so optimizer state stays in ordinary CPU memory "
            "(paging needs CUDA unified memory); this behaves exactly like adamw8bit"
        )
        # bitsandbytes would warn about the same fallback at the first step, from inside the loop;
        # the line above replaces it. This is the flag bitsandbytes itself sets after warning once.
        optimizer._cpu_paged_warned = True
    return optimizer


def _import_bnb_optim(name: str):
    # bitsandbytes reports at import that an optional 4-bit CPU matmul kernel is missing. That kernel
    # plays no part in the optimizers, so the message would only alarm; keep it out of this import.
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous = cpu_ops_log.level
    cpu_ops_log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as err:  # bitsandbytes raises RuntimeError, not only ImportError, on a bad native lib
        raise RuntimeError(
            f"optimizer {name!r} needs bitsandbytes, which failed to import ({type(err).__name__}: {err}); "
            "install it (pip install bitsandbytes) or pass --optimizer adamw"
        ) from err
    finally:
        cpu_ops_log.setLevel(previous)
    return bnb_optim


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and a no-decay group.

    Matrices (embeddings, linear weights) are decayed; 1-D tensors (biases, norm gains) are not, since
    pulling a norm's gain or a bias towards zero is a constraint, not regularisation. Frozen parameters
    (``requires_grad=False``, e.g. a LoRA base) are left out. Empty groups are dropped.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # named_parameters dedupes tied weights
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise InputError(f"{type(model).__name__} has no trainable parameters (all requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    final_lr_fraction: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``final_lr_fraction`` of the peak.

    The LR multiplier at optimizer step ``s`` is ``s / warmup_steps`` during warmup and
    ``f + (1 - f) * (1 + cos(pi * p)) / 2`` after it, with ``p = (s - warmup) / (total - warmup)``,
    reaching ``f`` at ``s = total_steps`` and staying there past it. Call ``scheduler.step()`` once per
    optimizer step; a scheduler passed through ``accelerator.prepare`` steps ``num_processes`` times per
    optimizer step unless ``split_batches`` is set, so count ``total_steps`` the way it is stepped.

    The same schedule as transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` up to
    ``total_steps`` (tests/test_train_optim.py compares them), on torch's ``LambdaLR``: importing
    ``transformers.optimization`` imports ``peft`` and through it ``bitsandbytes``, about 4 s per process
    on a 2-core CPU, paid by every run and by each process of a launch.
    """
    if total_steps < 1:
        raise InputError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise InputError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise InputError(f"final_lr_fraction must be in [0, 1], got {final_lr_fraction}")
    multiplier = functools.partial(
        _warmup_cosine_multiplier, warmup=warmup_steps, total=total_steps, final=final_lr_fraction
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _warmup_cosine_multiplier(step: int, *, warmup: int, total: int, final: float) -> float:
    # A module-level function in a partial, not a closure: LambdaLR's state_dict keeps a partial's
    # (empty) attributes and checkpoints stay picklable.
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
