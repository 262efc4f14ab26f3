"""Smoke test of ``bench/ppo_step.py --quick``: it runs end to end for both backends and writes sane rows.

Nothing about speed or memory ratios is asserted: the bench's figures are measured on an idle machine
and reported, not tested.
"""

import csv
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "ppo_step.py")


def test_quick_ppo_step_bench_writes_time_and_memory_rows_for_both_backends(tmp_path):
    out = tmp_path / "ppo_step.csv"
    # The bench launches its own children; they inherit FASTRLHF_HOME (set by conftest) for the models.
    env = {k: v for k, v in os.environ.items() if k not in ("FASTRLHF_BACKEND", "TRITON_INTERPRET")}
    cmd = [sys.executable, BENCH, "--quick", "--modes", "shared", "--backends", "fused,torch"]
    cmd += ["--csv", str(out), "--plot", str(tmp_path / "ppo_step.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets:" in proc.stdout

    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["mode"] for r in rows} == {"shared"}
    for backend, resolved in (("fused", "cpp"), ("torch", "torch")):
        mine = {r["metric"]: r for r in rows if r["provider"].startswith(backend + "-")}
        assert mine, f"no rows for {backend}"
        assert mine["time"]["provider"] in (f"{backend}-{resolved}", f"{backend}-torch")
        for metric in ("time", "time_generation", "time_experience", "time_update"):
            assert float(mine[metric]["median"]) > 0, (backend, metric)
        for metric in ("peak_rss", "peak_extra_memory", "param_bytes_policy"):
            assert float(mine[metric]["median"]) > 0, (backend, metric)
        assert mine["time"]["device"] and mine["time"]["fastrlhf_version"]
    # the torch backend really ran the plain-torch reference
    assert any(r["provider"] == "torch-torch" for r in rows)
