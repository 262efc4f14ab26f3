"""Backend discovery, the auto rules, and the FASTRLHF_BACKEND override."""

import os
import subprocess
import sys

import pytest
import torch

from fastrlhf.ops import available_backends
from fastrlhf.ops._backend import resolve_backend

CPU = torch.device("cpu")


def test_extension_is_built():
    """The installed package carries the compiled core; CI must never silently test only torch."""
    if os.environ.get("FASTRLHF_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("FASTRLHF_ALLOW_NO_EXTENSION=1")
    info = available_backends()["cpp"]
    assert info.available, info.reason
    from fastrlhf import _C

    assert _C.cpu_capability() in ("default", "avx2", "avx512")


def test_available_backends_report_reasons():
    infos = available_backends()
    assert set(infos) == {"torch", "cpp", "cuda", "triton"}
    assert infos["torch"].available
    for info in infos.values():
        assert info.reason, f"{info.name} has no reason text"
        if not info.available:
            assert info.devices == ()
    if not torch.cuda.is_available():
        assert not infos["cuda"].available


def test_auto_prefers_cpp_on_cpu():
    expected = "cpp" if available_backends()["cpp"].available else "torch"
    assert resolve_backend("auto", CPU) == expected


def test_env_overrides_auto_but_not_an_explicit_argument(monkeypatch):
    monkeypatch.setenv("FASTRLHF_BACKEND", "torch")
    assert resolve_backend("auto", CPU) == "torch"
    if available_backends()["cpp"].available:
        assert resolve_backend("cpp", CPU) == "cpp"


def test_the_fast_path_sees_the_env_as_it_is_set_at_run_time(monkeypatch):
    """``runs_compiled_op`` reads FASTRLHF_BACKEND on every call (from os.environ's own store): a value
    set, changed or removed after import takes effect on the next call, as in ``resolve_backend``."""
    from fastrlhf.ops import kl_penalty
    from fastrlhf.ops._backend import runs_compiled_op

    x = torch.randn(2, 5)
    compiled = available_backends()["cpp"].available
    monkeypatch.delenv("FASTRLHF_BACKEND", raising=False)
    assert runs_compiled_op("auto", x) == compiled
    for value, expected in (("torch", False), (" Auto ", compiled), ("", compiled), ("cpp", False)):
        monkeypatch.setenv("FASTRLHF_BACKEND", value)
        assert runs_compiled_op("auto", x) == expected, value
    assert not runs_compiled_op("auto", x.double()), "float64 goes to the torch reference under auto"
    monkeypatch.setenv("FASTRLHF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND='nonsense' is not one of"):
        kl_penalty(x, x)  # the Python path gives the error
    monkeypatch.delenv("FASTRLHF_BACKEND")
    assert runs_compiled_op("auto", x) == compiled


def test_env_naming_unusable_backend_is_reported(monkeypatch):
    monkeypatch.setenv("FASTRLHF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND='cuda'"):
        resolve_backend("auto", CPU)
    monkeypatch.setenv("FASTRLHF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTRLHF_BACKEND='nonsense' is not one of"):
        resolve_backend("auto", CPU)


def test_op_without_an_implementation_is_reported():
    with pytest.raises(ValueError, match="has no triton implementation"):
        resolve_backend("triton", CPU, op_backends=("torch", "cpp"))


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_each_cpu_capability_build_is_correct(capability):
    """Every compiled instruction-set variant of the C++ kernels, forced via ATEN_CPU_CAPABILITY."""
    if not available_backends()["cpp"].available:
        pytest.skip("no C++ extension")
    script = f"""
import torch
from fastrlhf import _C
from fastrlhf.ops import gather_logprobs, reference
assert _C.cpu_capability() == {capability!r}, _C.cpu_capability()
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (torch.randn(37, 20011) * 3).to(dtype).requires_grad_(True)
    y = torch.randint(0, 20011, (37,)); y[::5] = -100
    lp, ent = gather_logprobs(x, y, 0.7, return_entropy=True, backend="cpp")
    (lp.sum() + ent.sum()).backward()
    x64 = x.detach().double().requires_grad_(True)
    rlp, rent = reference.gather_logprobs(x64, y, 0.7, return_entropy=True)
    (rlp.sum() + rent.sum()).backward()
    assert (lp.double() - rlp).abs().max() < 1e-4, dtype
    assert (ent.double() - rent).abs().max() < 1e-4, dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (x.grad.double() - x64.grad).abs().max() < tol * max(1.0, x64.grad.abs().max().item()), dtype
    # Without entropy the forward sums its terms with a cheaper exp (no exact zeros below 2^-126).
    assert (gather_logprobs(x.detach(), y, 0.7, backend="cpp").double() - rlp).abs().max() < 1e-4, dtype
# Terms far below e^-87 (denormal or zero in fp32), -inf logits and a NaN row, in rows long enough for
# the SIMD loops: the log-probs of the large entries match float64, the NaN row is NaN.
x = torch.rand(5, 4099) * -60 - 100
x[:, :40] = torch.randn(5, 40)
x[:, 50::7] = -float("inf")
x[3, 1000] = float("nan")
y = torch.tensor([0, 7, 39, 3, 21])
lp = gather_logprobs(x, y, backend="cpp")
rlp = reference.gather_logprobs(x.double(), y)
assert lp[3].isnan() and (lp.double() - rlp)[[0, 1, 2, 4]].abs().max() < 1e-6, (lp, rlp)
from fastrlhf.ops import group_advantages
scores = torch.randn(37, 5)
mask = torch.rand(37 * 5, 203) > 0.2
for estimator in ("grpo", "rloo", "reinforce++", "reinforce++-baseline"):
    adv, ret = group_advantages(scores, mask, estimator, gamma=0.99, backend="cpp")
    radv, rret = reference.group_advantages(scores.double(), mask, estimator, 0.99)
    assert (adv.double() - radv).abs().max() < 1e-5 and (ret.double() - rret).abs().max() < 1e-5, estimator
from fastrlhf.ops import kl_penalty
gaps = torch.cat([torch.linspace(-88, 87, 20001), torch.logspace(-8, 0, 200), -torch.logspace(-8, 0, 200)])
logp = gaps.clone().requires_grad_(True)
kl_penalty(logp, torch.zeros_like(gaps), None, "k3", backend="cpp").sum().backward()
logp64 = gaps.double().requires_grad_(True)
kl64 = reference.kl_penalty(logp64, torch.zeros_like(logp64), None, "k3", None)
kl64.sum().backward()
kl = kl_penalty(gaps, torch.zeros_like(gaps), None, "k3", backend="cpp")
assert ((kl.double() - kl64).abs() <= 1e-6 * kl64.abs()).all(), "k3"
assert ((logp.grad.double() - logp64.grad).abs() <= 1e-6 * logp64.grad.abs()).all(), "d k3 / d logp"
# The mask is applied in SIMD registers per capability: NaN and inf where it drops a token must give 0
# there, in the value and in both gradients (per-token and uniform upstream gradients).
mask = torch.rand(7, 1001) > 0.3
lp = torch.randn(7, 1001) * 2
lp[~mask & (torch.rand(7, 1001) > 0.5)] = float("nan")
lp[~mask & (torch.rand(7, 1001) > 0.5)] = -float("inf")
rf = torch.randn(7, 1001) * 2
weights = torch.randn(7, 1001)
for upstream in (None, weights):
    x = lp.clone().requires_grad_(True); r = rf.clone().requires_grad_(True)
    out = kl_penalty(x, r, mask, "k3", backend="cpp")
    (out.sum() if upstream is None else (out * upstream).sum()).backward()
    x64 = lp.double().where(mask, 0.0).requires_grad_(True); r64 = rf.double().requires_grad_(True)
    out64 = reference.kl_penalty(x64, r64, mask, "k3", None)
    (out64.sum() if upstream is None else (out64 * upstream.double()).sum()).backward()
    pairs = ((out, out64, "masked k3"), (x.grad, x64.grad, "d/d logp"), (r.grad, r64.grad, "d/d ref"))
    for got, want, name in pairs:
        assert not got.isnan().any() and (got[~mask] == 0).all(), name
        assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), name
# Masked means count the kept tokens with SIMD per capability: lengths around the 32- and 64-byte steps
# and past one 16384-token segment; KL's seq-mean and token-mean, the PPO loss's two aggregations.
from fastrlhf.ops import ppo_policy_loss
for length in (1, 31, 32, 33, 63, 64, 65, 1000, 16387):
    m = torch.rand(3, length) > 0.4
    a, o, adv = torch.randn(3, length), torch.randn(3, length), torch.randn(3, length)
    for reduction in ("seq-mean", "token-mean"):
        got = kl_penalty(a, o, m, "k3", reduction=reduction, backend="cpp")
        want = kl_penalty(a.double(), o.double(), m, "k3", reduction=reduction, backend="torch")
        error = (got.double() - want).abs().max().item()
        assert error <= 1e-5 * max(1.0, want.abs().max().item()), (reduction, length, error)
    for agg in ("token-mean", "seq-mean-token-mean"):
        # NaN padding where the mask drops a token: no effect on the loss, a gradient of exactly 0 there.
        x = a.where(m, float("nan")).requires_grad_(True)
        got = ppo_policy_loss(x, o, adv, m, ref_logprobs=o, kl_coef=0.1, loss_agg=agg, backend="cpp")
        got.loss.backward()
        x64, o64, adv64 = a.double().requires_grad_(True), o.double(), adv.double()
        want = ppo_policy_loss(x64, o64, adv64, m, ref_logprobs=o64, kl_coef=0.1, loss_agg=agg)
        want.loss.backward()
        for field in ("loss", "clip_fraction", "approx_kl", "ref_kl"):
            g, w = float(getattr(got, field)), float(getattr(want, field))
            assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), (agg, field, length, g, w)
        assert not x.grad.isnan().any() and (x.grad[~m] == 0).all(), (agg, length)
        error = (x.grad.double() - x64.grad).abs().max().item()
        assert error <= 1e-5 * max(1e-3, x64.grad.abs().max().item()), (agg, length, error)
    # The whitening's masked mean and variance (it needs two kept tokens).
    if m.sum() >= 2:
        from fastrlhf.ops import compute_advantages
        scores, values = torch.randn(3), torch.randn(3, length)
        got = compute_advantages(scores, a, o, values, m, 0.1, "k3", 0.99, 0.95, backend="cpp")
        a64, o64, values64 = a.double(), o.double(), values.double()
        want = compute_advantages(scores.double(), a64, o64, values64, m, 0.1, "k3", 0.99, 0.95)
        for g, w in zip(got, want):
            error = (g.double() - w).abs().max().item()
            assert error <= 1e-4 * max(1.0, w.abs().max().item()), ("whitened advantages", length, error)
print("ok")
"""
    import platform

    if capability != "default" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-only capability")
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    needed = {"avx2": "avx2", "avx512": "avx512bw"}.get(capability)
    if needed and needed not in flags:
        pytest.skip(f"this CPU lacks {needed}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_import_without_extension_warns_once_and_falls_back():
    script = """
import importlib.abc, sys, warnings
class BlockExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastrlhf._C":
            raise ImportError("blocked by test")
sys.meta_path.insert(0, BlockExtension())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, fastrlhf
    from fastrlhf.ops import available_backends, gather_logprobs
    infos = available_backends()
    assert not infos["cpp"].available and "blocked by test" in infos["cpp"].reason
    x = torch.randn(3, 11); y = torch.tensor([1, 2, -100])
    lp = gather_logprobs(x, y)
    lp2 = gather_logprobs(x, y)
    ref = torch.log_softmax(x, -1).gather(-1, y.clamp_min(0)[:, None])[:, 0] * (y != -100)
    assert torch.allclose(lp, ref)
    from fastrlhf.ops import group_advantages
    adv, _ = group_advantages(torch.tensor([[1.0, 3.0]]), torch.ones(2, 4), "rloo")
    assert adv[:, 0].tolist() == [-2.0, 2.0]
ours = [w for w in caught if "fastrlhf._C" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
