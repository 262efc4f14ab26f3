"""What every op's bench spec provides, and the providers every spec shares.

A spec is a module with:
    OP           the op's name (the CSV's ``op`` column)
    MODES        the modes it supports, a subset of ("fwd", "bwd", "full")
    DTYPES       {"cpu": [...], "cuda": [...]} dtype names to run by default
    cases(device, quick) -> list[Case]   the first one the smallest valid input (``call_overhead``)
    make_inputs(case, device, dtype, requires_grad, generator) -> dict of tensors
    providers(device) -> list[Provider]       eager first: the ratios are taken against it
    bytes_moved(case, dtype, mode) -> int | None   the minimum bytes a memory-bound op must read and write
    TARGETS      list[Target]: the performance targets
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from fastrlhf.ops import available_backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Case:
    """One size of an op. ``size`` labels it (``--sizes`` picks by it); ``scale`` is the x-axis of the
    plots (the elements the op touches); ``params`` go to ``make_inputs``. ``call_overhead``: the
    smallest valid input, whose time is what a call costs beyond its work (reported apart, no memory)."""

    size: str
    scale: int
    params: dict
    call_overhead: bool = False


def with_call_overhead(cases: list[Case]) -> list[Case]:
    """The cases with the first (a spec's tiny ``CALL_SIZE``) marked as the call-overhead case."""
    return [dataclasses.replace(cases[0], call_overhead=True), *cases[1:]]


@dataclasses.dataclass
class Provider:
    """``fn(inputs) -> tensor``: the op's output, summed (or taken as is, when scalar) for the backward.
    ``fn`` is None when the provider cannot run here; ``reason`` says why. ``modes`` limits the modes
    (e.g. a forward-only peer). ``lazy``: built on its first call (torch.compile, a peer's import), so a
    failure there means "cannot run here", reported as a skip. ``compiles``: a torch.compile provider."""

    name: str
    fn: Callable[[dict], Any] | None
    reason: str = ""
    modes: tuple[str, ...] = ("fwd", "bwd", "full")
    lazy: bool = False
    compiles: bool = False


@dataclasses.dataclass(frozen=True)
class Target:
    """A performance target: ``provider`` (a prefix, e.g. "fastrlhf") against ``baseline`` in ``mode``
    at ``size`` on ``device``. ``metric``: "speedup" (baseline time / provider time ≥ bound),
    "time_ratio" (provider / baseline ≤ bound), "memory_ratio" (provider / baseline peak memory ≤ bound),
    "memory_fraction" (provider peak memory / ``reference_bytes`` ≤ bound), "call_us" (the provider's
    time in microseconds ≤ bound, on a call-cost size; no baseline) or "copy_fraction" (the bytes the
    spec's ``bytes_moved`` counts for the mode, per second, over the device's measured copy bandwidth
    ≥ bound; no baseline). ``source`` says what it measures."""

    mode: str
    size: str
    device: str
    metric: str
    bound: float
    baseline: str = "eager"
    provider: str = "fastrlhf"
    dtype: str = "fp32"
    reference_bytes: int = 0
    source: str = ""


def kernel_providers(
    device: str, make: Callable[[str], Callable[[dict], Any]], suffix: str = ""
) -> list[Provider]:
    """``fastrlhf-<backend><suffix>`` for every compiled/Triton backend, skipped with the reason where it
    can't run. ``suffix`` names a variant of the same op (e.g. ``-clamped``).

    Triton runs on CUDA only here: on CPU it would be the interpreter, which is a test tool, not a backend.
    """
    infos = available_backends()
    out = []
    for backend in ("cpp", "cuda", "triton"):
        info = infos[backend]
        if not info.available:
            out.append(Provider(f"fastrlhf-{backend}{suffix}", None, info.reason))
        elif device not in info.devices or (backend == "triton" and device == "cpu"):
            out.append(
                Provider(
                    f"fastrlhf-{backend}{suffix}", None, f"runs on {', '.join(info.devices)}, not {device}"
                )
            )
        else:
            out.append(Provider(f"fastrlhf-{backend}{suffix}", make(backend)))
    return out


def input_key(value: Any) -> Any:
    """One input as part of a compiled function's cache key: a tensor by its shape, dtype and grad flag;
    an option (a string, a number, a flag) as itself, whose change makes a new case; anything else (a
    NumPy array of ids) by its type alone."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.requires_grad
    return value if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


def compiled_provider(eager: Callable[[dict], Any], device: str, name: str = "torch.compile") -> Provider:
    """``torch.compile`` of the eager version, specialised to each case. Compiled on the first call of a
    case (the warm-up), so a device where inductor cannot compile reports the error as the skip reason.

    Every new case (shapes, dtypes, grad mode) starts from ``torch._dynamo.reset()``: dynamo's
    recompile limit counts per function, and past it dynamo silently runs the eager code, which would
    then be timed under this provider's name. ``fail_on_recompile_limit_hit`` makes that an error."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    state: dict = {}

    def run(inputs):
        key = (torch.is_grad_enabled(),) + tuple((k, input_key(v)) for k, v in inputs.items())
        if state.get("key") != key:
            torch._dynamo.reset()
            state["key"], state["fn"] = key, torch.compile(eager, dynamic=False)
        return state["fn"](inputs)

    return Provider(name, run, lazy=True, compiles=True)


def peer_provider(name: str, module: str, make: Callable[[], Callable[[dict], Any]], **kwargs) -> Provider:
    """A peer's function when its package is installed, else a skipped provider saying so. The import
    itself waits for the first call (importing TRL or Liger takes seconds, and every memory subprocess
    builds all providers); an import that fails then is reported as the skip reason."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        return Provider(name, None, f"{package} is not installed", **kwargs)
    state: dict = {}

    def run(inputs):
        if "fn" not in state:
            state["fn"] = make()
        return state["fn"](inputs)

    return Provider(name, run, lazy=True, **kwargs)


def batch_shape(tokens: int, batch: int) -> tuple[int, int]:
    """The ``[B, T]`` shape of a case's ``tokens`` tokens: ``batch`` sequences of ``tokens // batch``, or one
    token per sequence when there are fewer tokens than ``batch``, so a call-overhead case labelled "N=2"
    holds two tokens rather than ``batch`` empty sequences."""
    batch = max(1, min(batch, tokens))
    return batch, tokens // batch


def random_mask(shape, generator, device, min_fraction=0.5) -> torch.Tensor:
    """Right-padded bool mask ``[B, T]``: each row keeps a random prefix of at least ``min_fraction``·T."""
    batch, length = shape
    lengths = torch.randint(int(length * min_fraction), length + 1, (batch,), generator=generator)
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)
