"""CI's check of a ``run.py --quick`` output: every op wrote time rows for every provider that can run
here (installed peers and torch.compile included), peak-memory rows, and a plot for each device it ran
on. Nothing about speed is checked.

    python bench/check_smoke.py RESULTS.csv PLOTS_DIR
"""

from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402
from specs import SPECS  # noqa: E402


def main(csv_path: str, plots_dir: str) -> int:
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    problems = []
    for op, spec in SPECS.items():
        device = "cpu"
        expected = [p.name for p in spec.providers(device) if p.fn is not None]
        timed = {r["provider"] for r in rows if r["op"] == op and r["metric"] == "time"}
        problems += [f"{op}: no time rows for {name}" for name in expected if name not in timed]
        if not any(r["op"] == op and r["metric"] == "peak_extra_memory" for r in rows):
            problems.append(f"{op}: no peak-memory rows")
        for device in sorted({r["device"] for r in rows if r["op"] == op}):
            plot = os.path.join(plots_dir, plots.device_folder(device), f"{op}.png")
            if not (os.path.exists(plot) and os.path.getsize(plot) > 0):
                problems.append(f"{op}: no plot for {device} ({plot} missing or empty)")
    for problem in problems:
        print("smoke check:", problem)
    print(f"smoke check: {len(rows)} rows, {len(SPECS)} ops, {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
