"""Backends and peers that must work on this machine fail loudly here, instead of skipping their tests.

``FASTRLHF_REQUIRE`` (comma-separated) names them: a backend of ``fastrlhf.ops`` (cpp, triton, cuda) must
be available, anything else must import. CI sets it; a developer's machine without Triton skips.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from fastrlhf.ops import available_backends

REQUIRED = [name for name in os.environ.get("FASTRLHF_REQUIRE", "").split(",") if name]
BACKENDS = ("torch", "cpp", "triton", "cuda")


@pytest.mark.parametrize(
    "name", REQUIRED or [pytest.param("", marks=pytest.mark.skip(reason="FASTRLHF_REQUIRE is not set"))]
)
def test_required_backend_or_package_works_here(name):
    if name in BACKENDS:
        info = available_backends()[name]
        assert info.available, f"{name} is required (FASTRLHF_REQUIRE) but unavailable: {info.reason}"
    else:
        importlib.import_module(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_cuda_machine_has_the_cuda_backend():
    info = available_backends()["cuda"]
    assert info.available and "cuda" in info.devices, f"CUDA is present, the backend is not: {info.reason}"
