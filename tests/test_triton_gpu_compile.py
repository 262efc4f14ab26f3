"""Every Triton kernel compiles for sm_90 with the real compiler (not the interpreter), without a GPU.

The work is done by tests/triton_gpu_compile.py in a fresh process: this one runs Triton interpreted
(conftest sets TRITON_INTERPRET before triton is imported), and a kernel's mode is fixed at import.
"""

import os
import subprocess
import sys

import pytest

KERNELS = (
    "_advantages_fwd_kernel",
    "_gae_fwd_kernel",
    "_gather_logprobs_bwd_kernel",
    "_gather_logprobs_fwd_combine_kernel",
    "_gather_logprobs_fwd_kernel",
    "_gather_logprobs_fwd_partial_kernel",
    "_group_advantages_fwd_kernel",
    "_kl_penalty_bwd_kernel",
    "_kl_penalty_fwd_kernel",
    "_kl_penalty_sums_kernel",
    "_mean_of_sums_kernel",
    "_ranking_loss_bwd_kernel",
    "_ranking_loss_fwd_kernel",
)


def test_every_triton_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no CUDA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_gpu_compile.py")
    done = subprocess.run(
        [sys.executable, script, "90"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the sm_90 compile failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    for kernel in KERNELS:
        assert f"sm_90: {kernel}: " in done.stdout, f"{kernel} was never compiled:\n{done.stdout}"
