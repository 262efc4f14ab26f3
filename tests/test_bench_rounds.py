"""``bench/run.py --rounds``: providers timed in alternating order, the median round reported, memory
measured once, a failing provider skipped for good. ``run_one`` (the timing itself) is replaced by a
recorder, so these tests check the bookkeeping, not the machine."""

from __future__ import annotations

import argparse
import types

import pytest
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("run")


def _providers(*names):
    return [types.SimpleNamespace(name=name, fn=lambda inputs: None, modes=("fwd",)) for name in names]


def _recording_run_one(calls, timings, memory_calls, fails=()):
    """A stand-in for ``run_one``: records the order of calls and hands out the given timings in turn."""

    def run_one(spec, provider, case, dtype_name, mode, device, seed, args, measure_memory):
        calls.append(provider.name)
        if measure_memory:
            memory_calls.append(provider.name)
        if provider.name in fails:
            return "failed on its first call here: RuntimeError: no"
        return timings[provider.name].pop(0), (1000 if measure_memory else None)

    return run_one


def _measure(bench, monkeypatch, rounds, timings, fails=()):
    calls, memory_calls, skipped = [], [], []
    monkeypatch.setattr(bench, "run_one", _recording_run_one(calls, timings, memory_calls, fails))
    spec = types.SimpleNamespace(OP="op", bytes_moved=lambda case, dtype, mode: None)
    case = types.SimpleNamespace(size="N=1")
    args = argparse.Namespace(rounds=rounds, quick=False)
    active = _providers(*timings)
    result = bench.measure_providers(spec, active, case, "fp32", "fwd", "cpu", 0, args, True, skipped)
    return result, calls, memory_calls, skipped


def test_rounds_alternate_the_order_and_report_the_median_round(bench, monkeypatch):
    timings = {
        "eager": [(3.0, 2.0, 4.0), (1.0, 0.5, 1.5), (2.0, 1.0, 3.0)],
        "fastrlhf-cpp": [(0.2, 0.1, 0.3), (9.0, 8.0, 10.0), (0.4, 0.3, 0.5)],
    }
    (medians, memories), calls, memory_calls, skipped = _measure(bench, monkeypatch, 3, timings)
    assert calls == ["eager", "fastrlhf-cpp", "fastrlhf-cpp", "eager", "eager", "fastrlhf-cpp"]
    # each of median, p20, p80 is the median over the rounds: one slow round moves none of them
    assert medians == {"eager": (2.0, 1.0, 3.0), "fastrlhf-cpp": (0.4, 0.3, 0.5)}
    assert memory_calls == ["eager", "fastrlhf-cpp"]  # the first round only
    assert memories == {"eager": 1000, "fastrlhf-cpp": 1000}
    assert skipped == []


def test_one_round_is_the_plain_measurement(bench, monkeypatch):
    timings = {"eager": [(3.0, 2.0, 4.0)], "trl": [(1.0, 0.9, 1.1)]}
    (medians, _), calls, _, _ = _measure(bench, monkeypatch, 1, timings)
    assert calls == ["eager", "trl"]
    assert medians == {"eager": (3.0, 2.0, 4.0), "trl": (1.0, 0.9, 1.1)}


def test_a_failing_provider_is_skipped_once_and_not_run_again(bench, monkeypatch):
    timings = {"eager": [(1.0, 1.0, 1.0)] * 2, "liger": []}
    (medians, _), calls, _, skipped = _measure(bench, monkeypatch, 2, timings, fails=("liger",))
    assert calls == ["eager", "liger", "eager"]
    assert list(medians) == ["eager"]
    assert skipped == [["op", "liger", "failed on its first call here: RuntimeError: no"]]


def test_combine_rounds_refuses_no_rounds(bench):
    with pytest.raises(ValueError, match="at least one round"):
        bench.common.combine_rounds([])


def test_rounds_must_be_positive(bench):
    assert bench.positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer, got '0'"):
        bench.positive_int("0")
