"""Backend discovery and dispatch shared by every op.

Backends:
    torch   the plain-torch reference (``fastrlhf/ops/reference.py``); any device.
    cpp     the C++ CPU kernels of ``fastrlhf._C``; CPU tensors.
    cuda    the CUDA kernels of ``fastrlhf._C``; CUDA tensors, only in a CUDA build.
    triton  the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``backend="auto"`` (the default) can be overridden by the ``FASTRLHF_BACKEND`` environment variable. It
picks triton → cuda → torch for CUDA tensors and cpp → torch for CPU tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import torch

from fastrlhf._extension import load_extension

BACKENDS = ("torch", "cpp", "cuda", "triton")
# Input dtypes the compiled kernels (cpp, cuda, triton) read natively; they compute in fp32.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, on which devices, and why not when it can't."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (tests on a GPU-less machine)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def constant_for_compile(fn):
    """``torch.compiler.assume_constant_result(fn)``, without importing the compiler.

    torch's function imports ``torch._dynamo`` (and with it sympy, inductor and triton: ~150 MiB resident
    and 2.5 s on a 2-core CPU, in every process that calls an op) only to set the marker below, which dynamo
    reads when it traces a call to ``fn``. ``tests/test_compile.py`` compiles op calls with
    ``fullgraph=True`` and checks the marker against torch's own function, so a torch release that marks
    constants another way fails there.
    """
    fn._dynamo_marked_constant = True
    return fn


@functools.cache
def _triton_status() -> tuple[bool, str]:
    if not triton_interpreting() and not torch.cuda.is_available():
        # Nothing to run Triton kernels on: report it without importing triton (~40 MiB resident).
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed"
        return (
            False,
            "triton is installed but no CUDA device is visible (set TRITON_INTERPRET=1 to interpret)",
        )
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    if triton_interpreting():
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors through the interpreter"
    return True, "triton on CUDA"


@functools.cache
def available_backends() -> dict[str, BackendInfo]:
    """Report every backend: whether it runs here, on which devices, and why anything is missing.

    Computed once per process (what is installed does not change while it runs); treat as read-only.
    """
    ext, ext_reason = load_extension()
    infos = {"torch": BackendInfo("torch", True, ("cpu", "cuda"), "plain torch reference, always present")}

    if ext is None:
        infos["cpp"] = BackendInfo("cpp", False, (), ext_reason)
        infos["cuda"] = BackendInfo("cuda", False, (), ext_reason)
    else:
        infos["cpp"] = BackendInfo("cpp", True, ("cpu",), f"C++ CPU kernels, {ext.cpu_capability()} build")
        if not ext.with_cuda():
            infos["cuda"] = BackendInfo(
                "cuda",
                False,
                (),
                "fastrlhf._C was built without CUDA (CPU-only torch, no nvcc, or FASTRLHF_SKIP_CUDA)",
            )
        elif not torch.cuda.is_available():
            infos["cuda"] = BackendInfo("cuda", False, (), "built with CUDA but no CUDA device is visible")
        else:
            infos["cuda"] = BackendInfo("cuda", True, ("cuda",), "CUDA kernels compiled into fastrlhf._C")

    ok, reason = _triton_status()
    devices = ("cpu", "cuda") if triton_interpreting() else ("cuda",)
    infos["triton"] = BackendInfo("triton", ok, devices if ok else (), reason)
    return infos


def _auto_order(device_type: str) -> tuple[str, ...]:
    if device_type == "cuda":
        return ("triton", "cuda", "torch")
    return ("cpp", "torch")


@constant_for_compile
def _runnable_on(device_type: str) -> tuple[str, ...]:
    """Backends that can run on ``device_type`` tensors here.

    Marked constant for torch.compile: dynamo evaluates it once while tracing instead of tracing into
    the extension's query functions, so an op call compiles with no graph break. Memoised like
    ``available_backends``, which it reads: every op call with an explicit backend asks.
    """
    known = _RUNNABLE_ON.get(device_type)
    if known is None:
        infos = available_backends().items()
        known = _RUNNABLE_ON[device_type] = tuple(
            name for name, info in infos if info.available and device_type in info.devices
        )
    return known


_RUNNABLE_ON: dict[str, tuple[str, ...]] = {}


def resolve_backend(backend: str, device: torch.device, op_backends: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend that runs an op on tensors of ``device``.

    ``op_backends`` lists the backends that implement this op. An explicit ``backend`` argument wins;
    with ``"auto"``, ``FASTRLHF_BACKEND`` is used when set, else the auto order for the device. The
    variable is a preference for every op: an op without that backend takes its auto order.
    Raises ValueError naming the argument when the choice is unknown or cannot run on ``device``.
    """
    source = "backend"
    if backend == "auto":
        env = os.environ.get("FASTRLHF_BACKEND", "auto").strip().lower()
        if env not in ("", "auto"):
            backend, source = env, "FASTRLHF_BACKEND"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not one of {('auto',) + BACKENDS}")
    if source == "FASTRLHF_BACKEND" and backend not in op_backends:
        backend = "auto"

    runnable = _runnable_on(device.type)
    if backend == "auto":
        for name in _auto_order(device.type):
            if name in op_backends and name in runnable:
                return name
        return "torch"
    if backend not in op_backends:
        raise ValueError(
            f"{source}={backend!r}: this op has no {backend} implementation (it has {op_backends})"
        )
    if backend not in runnable:
        info = available_backends()[backend]
        if not info.available:
            raise ValueError(f"{source}={backend!r} is not available here: {info.reason}")
        raise ValueError(
            f"{source}={backend!r} cannot run on {device.type} tensors (it runs on {', '.join(info.devices)})"
        )
    return backend


# The backends whose kernels some ops register as TORCH_LIBRARY ops (``torch.ops.fastrlhf.*``, with their
# checks, reductions and autograd in C++): one per device type.
COMPILED_OP_BACKENDS = {"cpu": "cpp", "cuda": "cuda"}
_AUTO_RUNS_COMPILED_OP: dict[str, bool] = {}


@constant_for_compile
def _auto_runs_compiled_op(device_type: str) -> bool:
    known = _AUTO_RUNS_COMPILED_OP.get(device_type)
    if known is None:
        auto = next((b for b in _auto_order(device_type) if b in _runnable_on(device_type)), "torch")
        known = _AUTO_RUNS_COMPILED_OP[device_type] = auto == COMPILED_OP_BACKENDS.get(device_type)
    return known


def compiled_ops_run_on(device_type: str) -> bool:
    """Whether the TORCH_LIBRARY ops have kernels for ``device_type`` tensors here (the extension is
    loaded, with CUDA for "cuda"): what a Python path needs before it calls one of them directly."""
    return COMPILED_OP_BACKENDS.get(device_type) in _runnable_on(device_type)


def _backend_override() -> str | None:
    """``FASTRLHF_BACKEND`` as set now (tests and users change it at run time, so it is read on every call).

    ``os.environ.get`` encodes the key on each call, 1-2 µs: a sixth of a small op's whole cost. Where
    CPython backs ``os.environ`` with its usual dict of encoded keys, that dict is read directly; it is the
    one ``os.environ[...] = ...`` and ``del`` update.
    """
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and _ENV_KEY is not None:
        raw = data.get(_ENV_KEY)
        return None if raw is None else os.environ.decodevalue(raw)
    return os.environ.get("FASTRLHF_BACKEND")


def _env_key():
    try:
        return os.environ.encodekey("FASTRLHF_BACKEND")
    except AttributeError:  # not CPython's os._Environ
        return None


_ENV_KEY = _env_key()
# Read on every op call, for each of up to eight inputs: a module global is found faster than torch's
# attribute (0.7 against 1.1 µs over eight inputs on a 2-core EPYC).
_TENSOR = torch.Tensor
_FLOAT64 = torch.float64


def runs_compiled_op(backend: str, *inputs) -> bool:
    """The fast test of the common calls: True when the op should call its TORCH_LIBRARY op directly.

    That is ``backend="auto"`` with no ``FASTRLHF_BACKEND`` override picking the compiled kernels (cpp on
    CPU tensors, cuda on CUDA tensors) for ``inputs``, none of them float64; or ``backend`` naming the
    compiled backend of the inputs' device, where it runs. ``inputs`` are the op's tensors (None allowed),
    the first one tensor-valued. The C++ op checks its own arguments. False means "not decided here":
    the op takes its Python path, whose checks and ``pick_backend`` give every other case, and every
    error, its full treatment. It runs on every call, so each test in it is the cheapest one that works.
    """
    auto = backend == "auto"
    for t in inputs:
        if t is not None and (not isinstance(t, _TENSOR) or (auto and t.dtype is _FLOAT64)):
            return False
    first = inputs[0]
    device_type = "cpu" if first.is_cpu else first.device.type
    if auto:
        override = _backend_override()
        if override and override.strip().lower() != "auto":
            return False
        return _auto_runs_compiled_op(device_type)
    return backend == COMPILED_OP_BACKENDS.get(device_type) and backend in _runnable_on(device_type)


def pick_backend(
    backend: str,
    device: torch.device,
    inputs: dict[str, torch.Tensor],
    *,
    fp32_copies: bool = False,
    op_backends: tuple[str, ...] = BACKENDS,
) -> str:
    """The backend that runs an op on ``inputs`` (named as the op's arguments), by one rule for every op.

    - float64 inputs go to the torch reference under ``"auto"``: the kernels compute in fp32, and
      float64 is the reference's own precision (a test's ground truth stays exact);
    - otherwise ``resolve_backend`` picks (``FASTRLHF_BACKEND``, then the device's auto order);
    - a kernel backend reads ``KERNEL_DTYPES`` natively. An op that hands its kernels fp32 copies
      (``fp32_copies``: the advantage and ranking ops, whose inputs are small) takes any float dtype;
      the others refuse the rest, naming the input;
    - ``op_backends``: the backends the op has (``resolve_backend``).
    Raises ValueError naming the argument when the choice cannot run these inputs.
    """
    if backend == "auto" and any(t.dtype == torch.float64 for t in inputs.values()):
        return "torch"
    chosen = resolve_backend(backend, device, op_backends)
    if chosen != "torch" and not fp32_copies:
        for name, tensor in inputs.items():
            if tensor.dtype not in KERNEL_DTYPES:
                raise ValueError(
                    f"{name} dtype {tensor.dtype} is not supported by backend={chosen!r}; "
                    "use float32, bfloat16 or float16"
                )
    return chosen
