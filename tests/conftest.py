"""Test setup: run the real Triton kernels on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported, because ``triton.jit`` decides at
decoration time whether a kernel is compiled or interpreted. On a machine with a CUDA device the
kernels run compiled on the GPU instead (set FASTRLHF_TEST_TRITON_INTERPRET=1 to force the interpreter).
"""

import os
import sys
import tempfile

import torch
import torch.utils._python_dispatch

# The tiny model is built on first use under FASTRLHF_HOME; tests build their own, never touching ~/.cache.
os.environ.setdefault("FASTRLHF_HOME", tempfile.mkdtemp(prefix="fastrlhf-test-home-"))
# Model code loaded with trust_remote_code is copied into HF_MODULES_CACHE: a temporary one, likewise.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="fastrlhf-test-hf-modules-"))
# torch.compile's caches, likewise: inductor's FX-graph cache key does not include a custom op's schema, so a
# graph compiled against an earlier build of the C++ ops (a changed or removed op) would be replayed.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastrlhf-test-inductor-"))

# A test that crashes its process (a segfault in compiled code) shows its C++ frames beside Python's
# faulthandler trace; bench/gpu_check.sh sets this, where a crash cannot be rerun under a debugger.
if os.environ.get("FASTRLHF_FATAL_SIGNAL_TRACES") == "1":
    torch._C._set_print_stack_traces_on_fatal_signal(True)

if "triton" in sys.modules:  # pragma: no cover - would make the setting below ineffective
    raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET")

_force = os.environ.get("FASTRLHF_TEST_TRITON_INTERPRET")
if _force is not None:
    os.environ["TRITON_INTERPRET"] = _force
elif not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from fastrlhf.ops import available_backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def cpu_backends(include_torch: bool = True) -> list:
    """Backends that run on CPU tensors here, as pytest params (unavailable ones are skipped with why)."""
    infos = available_backends()
    names = (["torch"] if include_torch else []) + ["cpp", "triton"]
    params = []
    for name in names:
        info = infos[name]
        runs_on_cpu = info.available and "cpu" in info.devices
        marks = [] if runs_on_cpu else [pytest.mark.skip(reason=f"{name}: {info.reason}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def gpu_backends() -> list:
    infos = available_backends()
    params = []
    for name in ("torch", "cuda", "triton"):
        info = infos[name]
        runs_on_gpu = info.available and "cuda" in info.devices
        marks = [pytest.mark.gpu] + (
            [] if runs_on_gpu else [pytest.mark.skip(reason=f"{name}: {info.reason}")]
        )
        params.append(pytest.param(name, marks=marks, id=f"gpu-{name}"))
    return params


def op_targets(include_torch: bool = True) -> list:
    """Every (backend, device) an op runs on: the CPU backends here, then the GPU ones (marked gpu).

    Tests take ``backend, device`` from these params, build their inputs on ``device`` and compare with
    the float64 reference on the CPU, so one body checks every backend on both devices.
    """
    params = []
    for param in cpu_backends(include_torch):
        params.append(pytest.param(param.values[0], "cpu", marks=param.marks, id=f"cpu-{param.id}"))
    for param in gpu_backends():
        if param.values[0] == "torch" and not include_torch:
            continue
        params.append(pytest.param(param.values[0], "cuda", marks=param.marks, id=param.id))
    return params


def triton_targets() -> list:
    """op_targets' Triton params: the kernels themselves, interpreted on the CPU or compiled on a GPU."""
    return [p for p in op_targets(include_torch=False) if p.values[0] == "triton"]


class DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """``with DispatchedOps() as seen:`` records every op the block dispatches below autograd, in order
    (``seen.ops``, the overloads), and their names (``seen.names``): how a test shows which route a call
    took, or that a path does its arithmetic in its own kernels with none in torch around them."""

    def __init__(self):
        super().__init__()
        self.ops: list = []

    @property
    def names(self) -> set[str]:
        return {op.overloadpacket.__name__ for op in self.ops}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def on_device(device: str, *tensors) -> tuple:
    """The tensors moved to the device under test (None stays None); float64 references stay on the CPU."""
    return tuple(None if t is None else t.to(device) for t in tensors)


@pytest.fixture(autouse=True)
def fresh_seed():
    """A fresh seed per test (inputs are never the same twice); FASTRLHF_TEST_SEED replays a failure."""
    seed = int(os.environ.get("FASTRLHF_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"FASTRLHF_TEST_SEED={seed}")  # shown by pytest when the test fails
    yield seed
