"""The module under accelerate's wrappers, without importing DeepSpeed where nothing wraps it."""

from __future__ import annotations

from torch import nn


def unwrap_model(accelerator, model: nn.Module) -> nn.Module:
    """``accelerator.unwrap_model(model)``: the module under DDP / FSDP / DeepSpeed / torch.compile.

    accelerate's version imports DeepSpeed whenever it is installed, to test for its engine: in a single
    process that never uses it that is 0.5 s and 10-15 MiB of resident memory (measured in a PPO run on
    the 2-core CPU machine). A single-process accelerator prepares a model in place (mixed precision
    patches its ``forward``, which unwrapping keeps), so there is nothing to unwrap unless it was compiled.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.NO and not hasattr(model, "_orig_mod"):
        return model
    return accelerator.unwrap_model(model)
