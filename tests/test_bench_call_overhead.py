"""``bench/run.py`` times each op's call-overhead case (its smallest valid input) as the caller sees it:
with a wall clock that synchronises the device, not with device events, which on a GPU time the stream
and miss a host-bound call's own cost. ``time_step`` is replaced by a recorder, so these tests check
which clock each case asks for, not the machine."""

from __future__ import annotations

import argparse
import types

import pytest
import torch
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("run")


def _recorded_clocks(bench, monkeypatch, op: str) -> dict[str, bool]:
    clocks = {}
    current = {}

    def time_step(step, device, quick, wall_clock=False):
        step()  # the provider really runs on the case's inputs
        clocks[current["size"]] = wall_clock
        return (1e-6, 1e-6, 1e-6)

    monkeypatch.setattr(bench, "time_step", time_step)
    spec = bench.SPECS[op]
    eager = next(p for p in spec.providers("cpu") if p.name == "eager")
    args = argparse.Namespace(quick=True)
    for case in spec.cases("cpu", True):
        current["size"] = case.size
        timing, memory = bench.run_one(spec, eager, case, "fp32", "fwd", "cpu", 7, args, False)
        assert timing == (1e-6, 1e-6, 1e-6) and memory is None
    return clocks


@pytest.mark.parametrize("op", ["kl_penalty", "gae", "ranking_loss"])
def test_only_the_call_overhead_case_uses_the_wall_clock(bench, monkeypatch, op):
    cases = bench.SPECS[op].cases("cpu", True)
    clocks = _recorded_clocks(bench, monkeypatch, op)
    assert clocks == {case.size: case.call_overhead for case in cases}
    assert sum(clocks.values()) == 1


def test_the_timing_loop_alone_uses_the_wall_clock(bench, monkeypatch):
    seen = []
    monkeypatch.setattr(
        bench, "time_step", lambda step, device, quick, wall_clock=False: seen.append(wall_clock) or (1.0,)
    )
    spec = bench.SPECS["kl_penalty"]
    case = spec.cases("cpu", True)[0]
    assert bench.harness_seconds(spec, case, "fp32", "cpu", 3, types.SimpleNamespace(quick=True)) == 1.0
    assert seen == [True]


def _call_case_inputs(bench, op):
    spec = bench.SPECS[op]
    case = next(c for c in spec.cases("cpu", False) if c.call_overhead)
    return case, spec.make_inputs(case, "cpu", torch.float32, False, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "op", ["gather_logprobs", "linear_logprobs", "ppo_policy_loss", "kl_penalty", "gae", "ranking_loss"]
)
def test_the_call_overhead_case_is_not_empty(bench, op):
    """The cost of a call is measured on the path a real call takes: no input of the smallest case is
    empty (an empty batch would skip the kernels)."""
    _case, inputs = _call_case_inputs(bench, op)
    assert all(t.numel() > 0 for t in inputs.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("op", ["gather_logprobs", "linear_logprobs", "ppo_policy_loss"])
def test_the_call_overhead_case_holds_its_labelled_tokens(bench, op):
    case, inputs = _call_case_inputs(bench, op)
    assert inputs["labels"].numel() == case.params["tokens"] == 2
