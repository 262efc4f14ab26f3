"""PNG plots of the bench rows: per op, time and peak memory against problem size, one line per provider.

Each device (the CSV's ``device``: CPU model, threads and kernel copy, or the GPU's name) has its own folder,
``<plots dir>/<device folder>/<op>.png``, so a run on one machine never overwrites another machine's plots.
A plot holds the latest measurement of each point (op, provider, mode, metric, size, dtype) of its device
in the CSV, so a partial run (one op at one size, say) updates its points and keeps the rest.

A size label of the form ``"<variant>: <size>"`` (e.g. group_advantages' ``"grpo: B=512,k=8,T=1024"``)
draws one line per provider and variant, so variants of one op at the same size do not share a line.

    python bench/plots.py [--csv bench/results/bench.csv] [--plots-dir bench/results/plots] [--device NAME]

redraws every device's plots (or one device's) from a CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
# The columns that name one plotted point; a later row with the same values replaces an earlier one.
POINT_KEY = ("op", "provider", "mode", "metric", "size", "dtype")


def device_folder(device: str) -> str:
    """A folder name for a device string: ``"AMD EPYC (2 threads, avx2)"`` → ``"amd-epyc-2-threads-avx2"``."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "unknown-device"


def read_rows(csv_path: str) -> list[dict]:
    """Every row of a bench CSV, in file order (oldest first: the runner appends)."""
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def latest_points(
    rows: list[dict], devices: set[str] | None = None, ops: set[str] | None = None
) -> list[dict]:
    """The plottable rows (a ``scale``, a time or memory metric) of ``devices`` and ``ops`` (None: all),
    keeping per device and point only the last row in ``rows``' order, which is the latest measurement."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        if devices is not None and row.get("device") not in devices:
            continue
        if ops is not None and row.get("op") not in ops:
            continue
        if row.get("scale") in (None, "") or row.get("metric") not in ("time", "peak_extra_memory"):
            continue
        latest[(row.get("device", ""), *(row.get(k) for k in POINT_KEY))] = row
    return list(latest.values())


# Variants of one provider share its colour and differ in marker and line style.
MARKERS = ("o", "s", "^", "D")
LINESTYLES = ("-", "--", ":", "-.")


def _line_name(row: dict) -> tuple[str, str]:
    """(provider, variant): the variant is the size label's part before ": ", or "" when it has none."""
    variant, sep, _ = row["size"].partition(": ")
    return row["provider"], variant if sep else ""


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """One ``<device folder>/<op>.png`` under ``out_dir`` per device and op in ``rows`` (a row of panels per
    (dtype, mode), time left, memory right; log-log). Every row is drawn: pass ``latest_points(...)`` for one
    point per measurement. Returns the paths written; none when matplotlib is missing (said on stdout)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plots skipped: matplotlib not importable ({exc})")
        return []
    by_plot = defaultdict(list)
    for row in rows:
        if row.get("scale") not in (None, "") and row["metric"] in ("time", "peak_extra_memory"):
            by_plot[(row.get("device", ""), row["op"])].append(row)
    written = []
    mode_order = {"fwd": 0, "bwd": 1, "full": 2}
    for (device, op), op_rows in sorted(by_plot.items()):
        panels = sorted(
            {(r["dtype"], r["mode"]) for r in op_rows}, key=lambda p: (p[0], mode_order.get(p[1], 9))
        )
        providers = sorted({r["provider"] for r in op_rows})
        # one colour per provider across every panel of the figure
        colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(providers)}
        # With variants, one legend for the figure below the panels (a provider x variant grid), which
        # per-panel legends of that many lines would cover.
        variants = sorted({_line_name(r)[1] for r in op_rows})
        legend_height = 0.2 * len(providers) + 0.2 if variants != [""] else 0.0
        fig, axes = plt.subplots(
            len(panels), 2, figsize=(11, 3.0 * len(panels) + legend_height), squeeze=False
        )
        legend: dict = {}
        for (dtype, mode), (ax_time, ax_mem) in zip(panels, axes, strict=True):
            for metric, ax, scale, unit in (
                ("time", ax_time, 1e3, "ms"),
                ("peak_extra_memory", ax_mem, 2**-20, "MiB"),
            ):
                lines = defaultdict(list)
                for r in op_rows:
                    if r["dtype"] == dtype and r["mode"] == mode and r["metric"] == metric:
                        lines[_line_name(r)].append((float(r["scale"]), float(r["median"]) * scale))
                what = "time" if metric == "time" else "peak extra memory"
                ax.set_title(f"{op} {dtype} {mode}: {what}", fontsize=9)
                if not lines:
                    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                    ax.set_axis_off()
                    continue
                for (provider, variant), points in sorted(lines.items()):
                    points.sort()
                    # log axes: a measured 0 is drawn at the floor
                    ys = [max(y, 1e-3) for _, y in points]
                    (line,) = ax.plot(
                        [x for x, _ in points],
                        ys,
                        marker=MARKERS[variants.index(variant) % len(MARKERS)],
                        linestyle=LINESTYLES[variants.index(variant) % len(LINESTYLES)],
                        label=f"{provider} ({variant})" if variant else provider,
                        color=colours[provider],
                    )
                    legend.setdefault((variant, provider), line)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("problem size (elements)")
                ax.set_ylabel(f"{what} ({unit})")
                ax.grid(True, which="both", alpha=0.3)
                if not legend_height:
                    ax.legend(fontsize=7)
        # The points may come from several runs: the title gives the days they span.
        days = sorted({r["date"][:10] for r in op_rows if r.get("date")})
        measured = "" if not days else f", measured {days[0]}" + (f" to {days[-1]}" if len(days) > 1 else "")
        note = "median of repeats; lower is better; a 0 MiB peak is drawn at 1e-3"
        fig.suptitle(f"{op} on {device}{measured}\n({note})", fontsize=10)
        bottom = 0.0
        if legend_height:
            # Sorted by variant, then provider: one column per variant, filled top to bottom.
            entries = [legend[key] for key in sorted(legend)]
            fig.legend(
                entries,
                [line.get_label() for line in entries],
                loc="lower center",
                ncol=len(variants),
                fontsize=7,
                frameon=False,
            )
            bottom = legend_height / fig.get_figheight()
        # The two-line title takes about 0.4 inch at the top, whatever the figure's height.
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.4 / fig.get_figheight()))
        folder = os.path.join(out_dir, device_folder(device))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{op}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)  # atomic: a reader never sees half a PNG
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=os.path.join(HERE, "results", "bench.csv"))
    parser.add_argument("--plots-dir", default=os.path.join(HERE, "results", "plots"))
    parser.add_argument("--device", help="only this device's plots (its CSV device string); default: all")
    args = parser.parse_args(argv)
    if not os.path.exists(args.csv):
        parser.error(f"--csv: {args.csv} does not exist")
    rows = read_rows(args.csv)
    devices = None if args.device is None else {args.device}
    points = latest_points(rows, devices)
    if not points:
        known = sorted({r.get("device", "") for r in rows})
        parser.error(f"--device: no plottable rows for {args.device!r} in {args.csv}; it has {known}")
    written = write_plots(points, args.plots_dir)
    print(f"wrote {len(written)} plots under {os.path.relpath(args.plots_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
