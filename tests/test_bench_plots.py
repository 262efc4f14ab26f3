"""``bench/plots.py``: one folder of plots per device, each plot the device's latest measurement of every
point in the CSV, so that a partial run keeps the rest of a plot and never touches another machine's."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import plots  # noqa: E402
from common import write_csv  # noqa: E402

EPYC = "AMD EPYC (2 threads, avx2)"
XEON = "Intel(R) Xeon(R) Processor (2 threads, avx512)"


def _row(device, provider, size, scale, median, date, metric="time", op="kl_penalty", mode="full"):
    return dict(
        op=op,
        provider=provider,
        mode=mode,
        metric=metric,
        size=size,
        scale=scale,
        dtype="fp32",
        median=median,
        p20=median,
        p80=median,
        unit="s" if metric == "time" else "B",
        device=device,
        date=date,
    )


def test_device_folders_keep_every_device_string_apart():
    assert plots.device_folder(EPYC) == "amd-epyc-2-threads-avx2"
    assert plots.device_folder(XEON) == "intel-r-xeon-r-processor-2-threads-avx512"
    # The older EPYC rows, which did not name the kernel copy, get a folder of their own.
    assert plots.device_folder("AMD EPYC (2 threads)") != plots.device_folder(EPYC)
    assert plots.device_folder("NVIDIA H200") == "nvidia-h200"
    assert plots.device_folder("") == "unknown-device"


def test_latest_points_keeps_the_last_row_of_each_point_of_the_chosen_devices_and_ops():
    rows = [
        _row(EPYC, "eager", "B=2,T=8", "16", "1e-5", "2026-12-01T00:00:00Z"),
        _row(EPYC, "eager", "B=64,T=2048", "131072", "7e-4", "2026-12-01T00:00:00Z"),
        _row(XEON, "eager", "B=2,T=8", "16", "3e-5", "2026-12-02T00:00:00Z"),
        _row(EPYC, "eager", "B=2,T=8", "16", "2e-5", "2026-12-05T00:00:00Z"),  # a later run of one point
        _row(EPYC, "eager", "B=2,T=8", "16", "4e-6", "2026-12-05T00:00:00Z", metric="peak_extra_memory"),
        _row(EPYC, "eager", "B=2,T=8", "", "1e-5", "2026-12-05T00:00:00Z", op="gae"),  # no scale: not plotted
        _row(EPYC, "torch", "256MiB", "1", "3e10", "2026-12-05T00:00:00Z", metric="bandwidth", op="copy"),
    ]
    points = plots.latest_points(rows, {EPYC}, {"kl_penalty", "gae", "copy"})
    assert sorted((p["size"], p["metric"], p["median"]) for p in points) == [
        ("B=2,T=8", "peak_extra_memory", "4e-6"),
        ("B=2,T=8", "time", "2e-5"),  # the later of the two, the earlier dropped
        ("B=64,T=2048", "time", "7e-4"),  # not measured again: kept
    ]
    assert {p["device"] for p in plots.latest_points(rows)} == {EPYC, XEON}
    assert plots.latest_points(rows, {XEON}, {"gae"}) == []


def test_a_partial_run_redraws_its_device_only(tmp_path):
    pytest.importorskip("matplotlib")
    csv_path = str(tmp_path / "bench.csv")
    out = tmp_path / "plots"
    first = [
        _row(EPYC, "eager", "B=2,T=8", "16", "1e-5", "2026-12-01T00:00:00Z"),
        _row(EPYC, "eager", "B=64,T=2048", "131072", "7e-4", "2026-12-01T00:00:00Z"),
        _row(XEON, "eager", "B=2,T=8", "16", "3e-5", "2026-12-02T00:00:00Z"),
    ]
    write_csv(first, csv_path)
    written = plots.write_plots(plots.latest_points(plots.read_rows(csv_path)), str(out))
    xeon_plot = out / plots.device_folder(XEON) / "kl_penalty.png"
    epyc_plot = out / plots.device_folder(EPYC) / "kl_penalty.png"
    assert sorted(written) == sorted([str(epyc_plot), str(xeon_plot)])
    assert epyc_plot.stat().st_size > 0 and xeon_plot.stat().st_size > 0
    xeon_bytes = xeon_plot.read_bytes()

    # One more EPYC point, as run.py plots it: this run's device and ops, from the whole CSV.
    write_csv([_row(EPYC, "eager", "B=2,T=8", "16", "2e-5", "2026-12-05T00:00:00Z")], csv_path)
    points = plots.latest_points(plots.read_rows(csv_path), {EPYC}, {"kl_penalty"})
    assert len(points) == 2  # the new point and the one this run did not measure
    assert plots.write_plots(points, str(out)) == [str(epyc_plot)]
    assert xeon_plot.read_bytes() == xeon_bytes  # the other machine's plot is untouched
    assert sorted(p.name for p in out.iterdir()) == sorted([epyc_plot.parent.name, xeon_plot.parent.name])
    assert not list(out.rglob("*.tmp.png"))  # written atomically: no temporary left


def test_the_command_line_names_a_device_the_csv_lacks(tmp_path, capsys):
    csv_path = str(tmp_path / "bench.csv")
    write_csv([_row(EPYC, "eager", "B=2,T=8", "16", "1e-5", "2026-12-01T00:00:00Z")], csv_path)
    with pytest.raises(SystemExit):
        plots.main(["--csv", csv_path, "--plots-dir", str(tmp_path / "p"), "--device", "Apple M3"])
    err = capsys.readouterr().err
    assert "--device: no plottable rows for 'Apple M3'" in err and EPYC in err
    with pytest.raises(SystemExit):
        plots.main(["--csv", str(tmp_path / "missing.csv")])
    assert "missing.csv does not exist" in capsys.readouterr().err
