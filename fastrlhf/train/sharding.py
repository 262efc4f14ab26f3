"""What training needs around FSDP2: switching it on for a CPU launch, gathering a sharded model to save
it (``meta_replica``, ``gathered_copy``) and to generate with it (``gathered_for_generation``).

``accelerate launch --config_file examples/accelerate/fsdp2.yaml`` exports ``ACCELERATE_USE_FSDP=true``
and ``FSDP_VERSION=2``. On a GPU, accelerate then shards every prepared model with ``fully_shard``. On
a CPU-only machine it ignores those variables (accelerate 1.15 turns FSDP on only for accelerator
device types) and falls back to DDP over gloo, although torch's ``fully_shard`` runs on CPU with gloo.
``enable_fsdp2_on_cpu`` makes the CPU launch take the same FSDP2 path as a GPU one: the same wrapping,
sharded checkpoints and gathered final model, so that path is what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp2_on_cpu(accelerator) -> bool:
    """Switch a multi-process CPU ``accelerator`` to FSDP2 when the launcher asked for FSDP; returns
    whether it did. A no-op on GPU launches (accelerate already runs FSDP there) and single processes."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        from fastrlhf.errors import InputError

        raise InputError(
            f"FSDP_VERSION={plugin.fsdp_version}: on CPU fastrlhf runs FSDP2 only "
            "(set fsdp_version: 2 in the accelerate config, as examples/accelerate/fsdp2.yaml does)"
        )
    from accelerate.state import PartialState

    state.fsdp_plugin = plugin
    # Both shared states: every later ``AcceleratorState()`` re-reads the process-level type, and the
    # collectives accelerate runs for FSDP (barriers, reductions, RNG broadcast) take gloo all the same.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    release_freed_memory_to_the_os()
    log.info("FSDP2 on CPU: %d processes over gloo", state.num_processes)
    return True


# glibc's M_MMAP_THRESHOLD parameter number (malloc.h), and the threshold fastrlhf sets under FSDP on CPU.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def _libc():
    """The C library, loaded with ctypes, or None where it cannot be found."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_freed_memory_to_the_os() -> bool:
    """Pin glibc's mmap threshold at 128 KiB, so every large block is its own mapping and goes back to
    the OS when freed; returns whether it was set. Without it glibc raises the threshold to the size of
    each large block freed, and FSDP's per-unit gather buffers, once freed, stay in the heap: measured on
    a 58M-parameter Llama (2 processes, AdamW), FSDP2's peak resident set was then no lower than DDP's.
    A user's own ``MALLOC_MMAP_THRESHOLD_`` is left alone."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):  # not glibc (musl, macOS): nothing to pin
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def return_free_heap_to_the_os() -> bool:
    """``malloc_trim(0)``: hand the pages glibc's heap holds free back to the OS; returns whether it ran.

    Training frees its activations and rollout buffers into the heap, and glibc keeps those pages. Called
    before a one-off large allocation (the final model's serialisation), it keeps that allocation from
    landing on top of them: measured on the 2-core CPU machine (tiny Llama V=32000, PPO, separate
    models), the final save otherwise set the run's peak resident set, 15-35 MiB above training's.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):  # not glibc: nothing to trim
        return False
    libc.malloc_trim(0)
    return True


def meta_replica(model: nn.Module, leave_out: tuple = ()) -> nn.Module:
    """A copy of ``model``'s structure whose parameters and buffers live on the meta device: no memory,
    taken before sharding, so that ``gathered_copy`` can later rebuild a plain module (LoRA adapters,
    reward heads and tied weights included) without knowing how it was built. The modules in
    ``leave_out`` (held outside ``model.parameters()``, such as a frozen reference in a list) are not
    copied: the replica holds None in their place."""
    memo = {id(module): None for module in leave_out}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        # A model that transformers loaded partitioned for ZeRO-3 holds empty parameters that know
        # their whole shape.
        shape = getattr(tensor, "ds_shape", tensor.shape)
        meta = torch.empty(shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(meta, requires_grad=tensor.requires_grad)
            if isinstance(tensor, nn.Parameter)
            else meta
        )
    return copy.deepcopy(model, memo)


def gathered_copy(model: nn.Module, replica: nn.Module, accelerator) -> nn.Module | None:
    """The whole of a sharded (FSDP2 or ZeRO-3) ``model`` as a plain CPU module on the main process (None
    on the others): ``replica`` (``meta_replica`` of it before sharding, consumed) filled from the
    gathered full state dict.

    Collective: every process must call it. Only the main process holds the full weights, in CPU
    memory, so code written for a plain module (``save_pretrained``, LoRA merging, the reward model's
    classifier export with its probe forwards) runs on it unchanged."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from fastrlhf.train.zero import zero3_full_state_dict

        full = zero3_full_state_dict(model, accelerator)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    # assign=True: the replica's meta tensors become the gathered ones, with no second copy of the model.
    plain = replica
    plain.load_state_dict(full, strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies) are in no state dict; FSDP never shards buffers.
    live_buffers = dict(model.named_buffers())
    for name, buffer in list(plain.named_buffers()):
        if buffer.is_meta:
            owner_name, _, local_name = name.rpartition(".")
            owner = plain.get_submodule(owner_name)
            persistent = local_name not in owner._non_persistent_buffers_set
            value = live_buffers[name].detach().cpu().clone()
            owner.register_buffer(local_name, value, persistent=persistent)
    for module in plain.modules():  # a state dict holds tied parameters twice: tie them again
        if hasattr(module, "tie_weights") and hasattr(module, "get_input_embeddings"):
            module.tie_weights()
    return plain


# Frozen models above this size are sharded under FSDP; smaller ones are replicated on every process.
DEFAULT_SHARD_FROZEN_ABOVE_MIB = 256.0


def shard_frozen(module: nn.Module, layer_classes, above_mib: float, what: str) -> bool:
    """Shard a frozen (inference-only) ``module`` across the processes with ``fully_shard`` when its
    parameters exceed ``above_mib`` MiB and the run is under FSDP; returns whether it did. Each layer
    whose class is named in ``layer_classes`` (a model's ``_no_split_modules``) becomes one unit and the
    rest the root unit; every unit gathers its weights for its forward and frees them after it
    (``reshard_after_forward`` also on the root: with no backward to come, keeping them would only
    hold memory).

    Why a threshold: a sharded frozen model costs one all-gather per unit at every forward (the
    rollout's scoring, the reference log-probs), a replicated one costs its whole size on every process.
    Below a few hundred MiB the memory is cheaper than the communication.

    Collective afterwards: every process must run each forward of ``module``, as a prepared model's.
    ``module``'s own forward must be what is called (its root unit gathers the embeddings and norms)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import fully_shard

    if PartialState().distributed_type != DistributedType.FSDP:
        return False
    size_mib = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    if size_mib <= above_mib:
        log.info("%s: %.1f MiB of parameters, replicated (at most %g MiB)", what, size_mib, above_mib)
        return False
    names = set(layer_classes or ())
    layers = [m for m in module.modules() if type(m).__name__ in names]
    if not layers:
        from fastrlhf.errors import InputError

        raise InputError(f"{what}: none of its modules is a {sorted(names)} layer to shard")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(module, reshard_after_forward=True)
    log.info("%s: %.1f MiB of parameters, sharded in %d units", what, size_mib, len(layers) + 1)
    return True


def local_tensor(tensor):
    """This process's shard of a DTensor (FSDP2) or of a ZeRO-3 parameter, or the tensor itself."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reshard_all(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit in ``model``, so that its parameters are the
    sharded DTensors again. A root unit stays gathered after a forward that no backward followed (the
    evaluation's perplexity pass). A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Within the block every FSDP unit of ``model`` (an FSDP2 root) holds its whole parameters on every
    process and no forward inside gathers or reshards. So ``generate`` may run on the root's
    submodules (the policy LM: not the root's own forward), and the processes may take different numbers
    of decoding steps, which per-layer collectives would deadlock. Under ZeRO-3 the same holds through
    ``zero.zero3_gathered``. A no-op when ``model`` is not sharded.

    Collective on entry and exit: every process must enter it. Memory: the whole model per process for
    the block's length."""
    from torch.distributed.fsdp import FSDPModule

    from fastrlhf.train.zero import zero3_gathered

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        with zero3_gathered(model):
            yield model
        return
    states = [unit._get_fsdp_state() for unit in units]
    # A unit's first forward would otherwise find no initialised root and take itself for one.
    states[0]._lazy_init()
    # set_reshard_after_forward has no getter: keep what it overwrites, to put back afterwards.
    saved = [(s, s._auto_reshard_after_forward) for s in states]
    saved_groups = [(g, g.post_forward_mesh_info) for s in states for g in s._fsdp_param_groups]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        for state, auto in saved:
            state._auto_reshard_after_forward = auto
        for group, mesh_info in saved_groups:
            group.post_forward_mesh_info = mesh_info
