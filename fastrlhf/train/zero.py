"""What training needs around DeepSpeed ZeRO: switching it on for a CPU launch, filling the values a
launcher config leaves to the trainer, and, for PPO under ZeRO-3, gathering the whole model for
rollouts (``zero3_gathered``) and registering the weights its fused losses read (``track_zero3_model``).

``accelerate launch --config_file examples/accelerate/zero2.yaml`` (or ``zero3.yaml``) exports
``ACCELERATE_USE_DEEPSPEED=true`` and the ZeRO stage. accelerate 1.15 turns DeepSpeed on only when the
``Accelerator`` is not told ``cpu=True``, and a CPU-only machine needs ``cpu=True`` to form its gloo
process group, so a CPU launch silently runs DDP. DeepSpeed itself runs on CPU (its CPU accelerator,
over gloo): ``enable_deepspeed_on_cpu`` makes the CPU launch take the same path as a GPU one, which is
what the CPU tests exercise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref

from fastrlhf.errors import InputError
from fastrlhf.train.sharding import release_freed_memory_to_the_os

log = logging.getLogger(__name__)


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch`` with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def requested_zero_stage() -> int | None:
    """The ZeRO stage the launcher asked for, or None without DeepSpeed."""
    if not deepspeed_requested():
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def enable_deepspeed_on_cpu(accelerator) -> bool:
    """Switch a multi-process CPU ``accelerator`` to DeepSpeed when the launcher asked for it; returns
    whether it did. A no-op on GPU launches (accelerate already runs DeepSpeed there) and single
    processes."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    state = accelerator.state
    if not deepspeed_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    if state.mixed_precision != "no":
        raise InputError(
            f"mixed_precision: {state.mixed_precision} under DeepSpeed on CPU is not supported "
            "(DeepSpeed's CPU path is tested in fp32: use --mixed-precision no)"
        )
    try:
        import deepspeed
    except ImportError as error:
        raise InputError(
            "the launcher config asks for DeepSpeed (distributed_type: DEEPSPEED), which is not installed "
            f"here ({error}); pip install deepspeed, or launch with examples/accelerate/fsdp2.yaml"
        ) from error

    plugin = DeepSpeedPlugin()  # reads the launcher's ACCELERATE_DEEPSPEED_* variables
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    # Both shared states: every later ``AcceleratorState()`` re-reads the process-level type.
    PartialState().distributed_type = DistributedType.DEEPSPEED
    state.distributed_type = DistributedType.DEEPSPEED
    # DeepSpeed's CPU accelerator names oneCCL as its backend; the group accelerate formed is gloo's.
    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    # As under FSDP on CPU: the per-module gather buffers of ZeRO-3 go back to the OS once freed.
    release_freed_memory_to_the_os()
    log.info("DeepSpeed ZeRO-%d on CPU: %d processes over gloo", plugin.zero_stage, state.num_processes)
    return True


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill what the shipped configs leave as ``auto`` from the trainer's flags, before ``prepare``:
    the micro-batch per process (accelerate otherwise takes it from a dataloader passed to the same
    ``prepare``; PPO has none) and the gradient clipping (``--max-grad-norm``; 0: off). DeepSpeed clips
    inside its own optimizer step, so the flag must reach its config. A no-op without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_clipping"] = float(max_grad_norm)


def zero3_full_state_dict(model, accelerator) -> dict | None:
    """The whole state dict of a ZeRO-3 ``model`` (its parameters partitioned over the processes) as CPU
    tensors on the main process, None on the others. Collective: every process must call it. The
    parameters are gathered one module at a time, so no process ever holds all of them on its device."""
    import deepspeed

    full = {} if accelerator.is_main_process else None
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            if full is not None:
                for name, tensor in module.state_dict(keep_vars=True).items():
                    if "." not in name:  # this module's own parameters and buffers, not its children's
                        full[f"{prefix}.{name}" if prefix else name] = tensor.detach().cpu().clone()
    return full


@contextlib.contextmanager
def gradient_sync(accelerator, model, sync: bool):
    """The forward and backward inside reduce gradients across processes and end the accumulation only
    when ``sync``. Under DDP the others run in ``no_sync``; DeepSpeed's engine has no ``no_sync`` under
    ZeRO-2/3 (it reduces every backward into its gradient partitions) and is told the accumulation
    boundary instead, where ``accelerator.backward`` takes its optimizer step."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(sync)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    elif sync:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def refresh_master_weights(accelerator) -> None:
    """Call after changing parameters in place outside the optimizer (the critic's calibration).
    ZeRO-1/2 keep an fp32 master copy of each process's partition and write it back over the parameters
    at every step, which would undo the change; this copies the parameters into it. A no-op without
    DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.deepspeed_engine_wrapped.engine.optimizer.refresh_fp32_params()


@contextlib.contextmanager
def whole_model_construction(accelerator):
    """Within the block transformers builds models whole. Under ZeRO-3 it otherwise builds every model
    partitioned across the processes (``deepspeed.zero.Init``, which accelerate arms for it), and
    partitioning is a collective: code that one process runs alone, such as the final export building
    a sequence classifier, would wait for the others forever. A no-op without ZeRO-3."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # arms it again, as accelerate did


# The ZeRO-3 parameter coordinator (DeepSpeed's ``parameter_offload``) of each prepared model, keyed by the
# unwrapped module: ``zero3_gathered`` needs it to take the per-module gather hooks off and put them back.
_ZERO3_OFFLOAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def track_zero3_model(accelerator, prepared, unwrapped, external: tuple = ()) -> bool:
    """Under ZeRO-3, remember ``prepared``'s (a DeepSpeed engine's) parameter coordinator for
    ``zero3_gathered`` and register the ``external`` parameters (those that ``unwrapped.forward`` reads
    outside their own module's forward, such as a policy's lm_head weight read by a fused loss) with the
    root module, so DeepSpeed gathers them for its forward and backward. Returns whether it did."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    if accelerator.state.deepspeed_plugin.zero_stage != 3:
        return False
    import deepspeed

    _ZERO3_OFFLOAD[unwrapped] = prepared.optimizer.parameter_offload
    for parameter in external:
        if parameter is not None:
            deepspeed.zero.register_external_parameter(unwrapped, parameter)
    return True


@contextlib.contextmanager
def zero3_gathered(model):
    """Within the block every parameter of ``model`` (tracked by ``track_zero3_model``) is whole on every
    process and no forward inside gathers or releases any: the gather hooks are off. So generation may
    run on submodules for as many decoding steps as each process needs (per-module collectives would
    deadlock when they differ), and code may read any weight, the lm_head's included. Changes made
    inside are not kept. A no-op for a model ZeRO-3 does not partition.

    Collective on entry and exit. Memory: the whole model per process for the block's length."""
    offload = _ZERO3_OFFLOAD.get(model)
    if offload is None:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        for parameter in model.parameters():
            parameter.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield model
        finally:
            # Re-registering on the root also invalidates the coordinator's recorded fetch order, which
            # the forwards inside did not follow.
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def zero3_modifiable(model, parameters):
    """Within the block ``parameters`` of ``model`` are whole and what is written into them is kept (the
    main process's values are partitioned back on exit). A no-op unless ZeRO-3 partitions ``model``."""
    if model not in _ZERO3_OFFLOAD:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(parameters), modifier_rank=0):
        yield
