"""``bench/run.py``'s target table: each metric computed from the measured times against the specs' real
targets, with the verdict on the right side of the bound. The times are given, so these tests check the
arithmetic and the verdicts, not the machine."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("run")


def _row(rows, op, size, metric):
    found = [r for r in rows if r[0].startswith(f"{op} {size} ") and r[1] == metric]
    assert len(found) == 1, rows
    return found[0]


def test_copy_fraction_is_the_bytes_moved_per_second_over_the_copy_bandwidth(bench):
    spec = bench.SPECS["kl_penalty"]
    case = bench.find_case(spec, "cpu", False, "B=256,T=8192")
    moved = spec.bytes_moved(case, torch.float32, "full")
    copy_bw = 20e9
    at_copy_speed = moved / copy_bw  # seconds a copy of as many bytes takes
    for seconds, verdict in ((at_copy_speed / 0.9, "met"), (at_copy_speed / 0.7, "**MISSED**")):
        results = {
            ("kl_penalty", "B=256,T=8192", "fp32", "full"): {
                "eager": (1.0, None),
                "fastrlhf-cpp": (seconds, None),
            }
        }
        row = _row(
            bench.evaluate_targets(results, "cpu", copy_bw, False),
            "kl_penalty",
            "B=256,T=8192",
            "copy_fraction",
        )
        assert row[2] == "≥ 0.8"
        assert row[3] == f"{at_copy_speed / seconds:.3g} (fastrlhf-cpp)"
        assert row[4].startswith(verdict)


def test_copy_fraction_needs_no_baseline_and_picks_the_fastest_backend(bench):
    spec = bench.SPECS["gather_logprobs"]
    case = bench.find_case(spec, "cpu", False, "N=8192,V=32000")
    copy_bw = 25e9
    at_copy_speed = spec.bytes_moved(case, torch.float32, "bwd") / copy_bw
    measured = {"fastrlhf-cpp": (at_copy_speed / 0.4, None), "fastrlhf-triton": (at_copy_speed / 0.6, None)}
    results = {("gather_logprobs", "N=8192,V=32000", "fp32", "bwd"): measured}
    row = _row(
        bench.evaluate_targets(results, "cpu", copy_bw, False),
        "gather_logprobs",
        "N=8192,V=32000",
        "copy_fraction",
    )
    assert row[3] == "0.6 (fastrlhf-triton)" and row[4].startswith("met")


def test_speedup_and_time_ratio_verdicts(bench):
    key = ("gather_logprobs", "N=8192,V=32000", "fp32", "fwd")
    results = {key: {"eager": (1.0, None), "read-once": (0.2, None), "fastrlhf-cpp": (0.25, None)}}
    rows = bench.evaluate_targets(results, "cpu", 20e9, False)
    speedup = [r for r in rows if r[0].endswith("vs eager") and r[1] == "speedup" and " fwd:" in r[0]]
    assert speedup[0][3] == "4 (fastrlhf-cpp)" and speedup[0][4].startswith("**MISSED**")  # 4x < 5x
    ratio = _row(rows, "gather_logprobs", "N=8192,V=32000", "time_ratio")
    assert ratio[3] == "1.25 (fastrlhf-cpp)" and ratio[4].startswith("met")  # 1.25 ≤ 1.3
