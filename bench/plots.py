"""PNG plots of the bench rows: per op, time and peak memory against problem size, one line per provider.

A size label of the form ``"<variant>: <size>"`` (e.g. group_advantages' ``"grpo: B=512,k=8,T=1024"``)
draws one line per provider and variant, so variants of one op at the same size do not share a line.
"""

from __future__ import annotations

import os
from collections import defaultdict

# Variants of one provider share its colour and differ in marker and line style.
MARKERS = ("o", "s", "^", "D")
LINESTYLES = ("-", "--", ":", "-.")


def _line_name(row: dict) -> tuple[str, str]:
    """(provider, variant): the variant is the size label's part before ": ", or "" when it has none."""
    variant, sep, _ = row["size"].partition(": ")
    return row["provider"], variant if sep else ""


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """One ``<op>.png`` per op in ``rows`` (a row per (dtype, mode), time left, memory right; log-log).
    Returns the paths written; none when matplotlib is missing (said on stdout)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"plots skipped: matplotlib not importable ({exc})")
        return []
    by_op = defaultdict(list)
    for row in rows:
        if row.get("scale") not in (None, "") and row["metric"] in ("time", "peak_extra_memory"):
            by_op[row["op"]].append(row)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    mode_order = {"fwd": 0, "bwd": 1, "full": 2}
    for op, op_rows in by_op.items():
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
        device = op_rows[0].get("device", "")
        note = "median of repeats; lower is better; a 0 MiB peak is drawn at 1e-3"
        fig.suptitle(f"{op} on {device} ({note})", fontsize=10)
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
        fig.tight_layout(rect=(0, bottom, 1, 0.98))
        path = os.path.join(out_dir, f"{op}.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)  # atomic: a reader never sees half a PNG
        plt.close(fig)
        written.append(path)
    return written
