"""An exponential moving average of the policy's weights (InstructGPT's EMA, ``--ema-decay``) under any
engine: one process, DDP, ZeRO-2, ZeRO-3 or FSDP2.

The average is kept in each parameter's own layout: a plain tensor under DDP, a DTensor with the
parameter's sharding under FSDP2, this process's partition under ZeRO-3, so every process averages only
its own shard and nothing is gathered while training. Only trainable parameters are averaged: the
average of a frozen weight is the weight (in ``lora`` mode that leaves the base model out of the copy).
For the final model the averages are swapped into the policy, which is then saved the usual way
(gathered, under FSDP2 and ZeRO-3).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from fastrlhf.train.sharding import local_tensor


def _is_sharded(tensor) -> bool:
    return hasattr(tensor, "to_local")


def _is_partitioned(parameter) -> bool:
    """A ZeRO-3 parameter: its data is empty outside a gather, this process's part is ``ds_tensor``."""
    return hasattr(parameter, "ds_tensor")


class WeightEMA:
    """``average ← decay · average + (1 - decay) · weight`` after every optimizer step, per trainable
    parameter of ``module`` (the first update copies the weights, as ``torch.optim.swa_utils``' EMA
    does)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        # Under ZeRO-3 the average is of this process's partition; under FSDP2 a DTensor like the weight.
        self.partitioned = any(_is_partitioned(p) for _, p in trainable)
        self.average = {
            name: (local_tensor(p) if self.partitioned else p).detach().clone() for name, p in trainable
        }

    @property
    def sharded(self) -> bool:
        return any(_is_sharded(average) for average in self.average.values())

    def _local_pairs(self, module: nn.Module):
        """``(name, this process's average, this process's weight)`` per averaged parameter."""
        parameters = dict(module.named_parameters())
        for name, average in self.average.items():
            target, weight = local_tensor(average), local_tensor(parameters[name]).detach()
            if target.shape != weight.shape:
                raise RuntimeError(
                    f"{name}: the weight is {tuple(weight.shape)} on this process, its average "
                    f"{tuple(target.shape)}; a sharded model must be resharded first (sharding.reshard_all)"
                )
            yield name, target, weight

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold ``module``'s current weights (the same module the average was made from) in."""
        # Local shards: the update is elementwise, so each process needs only its own.
        for _, target, weight in self._local_pairs(module):
            if self.updates == 0:
                target.copy_(weight)
            else:
                target.lerp_(weight, 1.0 - self.decay)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module):
        """Within the block ``module``'s trainable weights are the averages; restored on exit."""
        pairs = list(self._local_pairs(module))
        with torch.no_grad():
            kept = [weight.clone() for _, _, weight in pairs]
            for _, average, weight in pairs:
                weight.copy_(average)
        try:
            yield module
        finally:
            with torch.no_grad():
                for (_, _, weight), original in zip(pairs, kept, strict=True):
                    weight.copy_(original)

    # ---- checkpoints: a safetensors file, or under FSDP2 a torch.distributed.checkpoint directory ----

    def _state(self) -> dict:
        return {**self.average, "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def _where(self, path: Path) -> Path:
        if self.sharded:
            return Path(path)
        if self.partitioned:  # one file per process, as DeepSpeed's own ZeRO-3 checkpoints are
            import torch.distributed as dist

            return Path(path).with_suffix(f".rank{dist.get_rank()}.safetensors")
        return Path(path).with_suffix(".safetensors")

    def save_checkpoint(self, path: Path, accelerator) -> None:
        """Write the averages at ``path``. Collective: every process must call it. Sharded averages go
        through torch.distributed.checkpoint into the directory ``path`` (each process writes its
        shards); ZeRO-3 partitions into ``path.rank<r>.safetensors``, one per process; plain ones into
        ``path.safetensors``, written once, by the main process."""
        where = self._where(path)
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._state(), checkpoint_id=str(where))
        elif accelerator.is_main_process or self.partitioned:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self._state().items()}, str(where))

    def load_checkpoint(self, path: Path) -> None:
        """Read what ``save_checkpoint`` wrote at ``path`` (every process, under FSDP2 and ZeRO-3)."""
        where = self._where(path)
        if not where.exists():
            raise FileNotFoundError(f"{where}: no EMA of the policy; was the run saved with the same flags?")
        state = self._state()
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            dcp.load(state, checkpoint_id=str(where))  # in place, into this process's shards
        else:
            from safetensors.torch import load_file

            saved = load_file(str(where))
            if saved.keys() != state.keys():
                raise ValueError(f"{path}: holds an EMA of other parameters than this run's policy")
            for name, tensor in saved.items():
                state[name].copy_(tensor)
        self.updates = int(state["updates"])
