"""``bench/gpu_profile.py``: the host/device split per call. On the CPU there are no device events, so
the device time is 0 and the wall time is the host's; these tests check that every requested case runs
and reports, and that the profiler's own accounting feeds the figures (not how fast anything is)."""

from __future__ import annotations

import sys

import pytest
import torch
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def gpu_profile():
    return load_bench_script("gpu_profile")


def test_each_case_reports_wall_device_and_host_time(gpu_profile, monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        ["gpu_profile.py", "--ops", "ranking_loss", "--backends", "torch", "--calls", "2", "--device", "cpu"],
    )
    gpu_profile.main()
    out = capsys.readouterr().out
    assert out.startswith(f"device: {gpu_profile.common.device_name('cpu')}; torch ")  # names the CPU
    summary = out.split("summary (per call):", 1)[1].strip().splitlines()
    assert [line.split()[:3] for line in summary] == [
        ["ranking_loss", "torch", "fwd"],
        ["ranking_loss", "torch", "full"],
    ]
    for line in summary:
        words = line.split()
        wall, device, host = (float(words[words.index(key) + 1]) for key in ("wall", "device", "host"))
        assert wall > 0 and host > 0 and device == 0.0  # no device events on the CPU


def test_profile_counts_the_call_it_wraps(gpu_profile):
    calls = []

    def call():
        calls.append(1)
        torch.ones(8).sum()

    device_s, host_s, table = gpu_profile.profile(call, "cpu", 3, 5)
    assert len(calls) == 3 and host_s > 0 and device_s == 0.0
    assert "one_call" in table


def test_unknown_op_is_refused_by_name(gpu_profile, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gpu_profile.py", "--ops", "kl,ranking_loss", "--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_profile.main()
