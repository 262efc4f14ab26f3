"""The sweep behind `fastrlhf ppo`'s defaults: one setting changed at a time from a base, on every task of
the alignment benchmark and several seeds, judged by the held-out gold score and the KL it cost.

Each variant is a set of `fastrlhf ppo` flags on top of the trainer's defaults; ``base`` is the defaults
themselves. Every (task, seed) unit trains its SFT policy and reward model once (``bench/alignment.py``),
and every variant starts from them. Rows go to ``bench/results/ppo_sweep.csv`` (the alignment CSV's
columns, ``tag`` = the variant); the table printed last ranks the variants by the mean share of the
SFT -> best gold gap they closed, with their mean KL and the worst task's share.

    python bench/ppo_sweep.py --workers 2                      # every variant, 3 tasks x 3 seeds
    python bench/ppo_sweep.py --variants base,lr3e-4 --seeds 0 # a part of it
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import alignment  # noqa: E402 - the bench directory is on the path only from here

# One setting changed at a time from the defaults (base), covering what the trainer exposes: the learning
# rate, the budget (steps, rollout size), minibatches, epochs, the KL penalty (β, adaptive target), the clip
# range, the value-loss weight, reward normalisation, advantage whitening and the EOS penalty.
VARIANTS = {
    "base": {},
    "lr5e-5": {"learning_rate": "5e-5"},
    "lr3e-4": {"learning_rate": "3e-4"},
    "lr1e-3": {"learning_rate": "1e-3"},
    "steps40": {"steps": "40"},
    "steps100": {"steps": "100"},
    "rollout64": {"rollout_batch_size": "64"},
    "minibatch32": {"minibatch_size": "32"},
    "epochs1": {"ppo_epochs": "1"},
    "epochs4": {"ppo_epochs": "4"},
    "kl0.02": {"kl_coef": "0.02"},
    "kl0.2": {"kl_coef": "0.2"},
    "fixed_kl": {"target_kl": "0"},
    "target_kl8": {"target_kl": "8"},
    "clip0.1": {"clip_eps": "0.1"},
    "clip0.3": {"clip_eps": "0.3"},
    "vf0.5": {"vf_coef": "0.5"},
    "norm_none": {"reward_norm": "none"},
    "norm_batch": {"reward_norm": "batch"},
    "no_whiten": {"whiten_advantages": "false"},
    "eos_penalty0": {"missing_eos_penalty": "0"},
    # PPO-ptx's γ (run with --method ppo-ptx).
    "ptx0.1": {"ptx_coef": "0.1"},
    "ptx2": {"ptx_coef": "2"},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tasks", default="refusal,concise,format")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--method", default="ppo", choices=sorted(alignment.METHODS))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/alignment"))
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "ppo_sweep.csv")
    args = parser.parse_args(argv)
    rows = []
    for name in [v for v in args.variants.split(",") if v]:
        if name not in VARIANTS:
            parser.error(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        child = ["--tasks", args.tasks, "--seeds", args.seeds, "--methods", args.method]
        child += ["--workers", str(args.workers), "--out", str(args.out)]
        child += ["--tag", "" if name == "base" else name]
        child += [x for key, value in VARIANTS[name].items() for x in ("--set", f"{key}={value}")]
        variant_args = alignment.parse_args(child)
        units = [(t, s) for t in variant_args.tasks for s in variant_args.seeds]
        variant_rows = alignment.run_units(variant_args, units)
        for row in variant_rows:
            row["tag"] = name
        alignment.write_csv(variant_rows, args.csv)
        rows += variant_rows
        print(ranking(rows), flush=True)


def ranking(rows: list[dict]) -> str:
    lines = [
        "| variant | mean gap closed | worst task (mean over seeds) | mean KL | mean win rate | runs |",
        "|---|---|---|---|---|---|",
    ]
    scored = []
    for tag in sorted({r["tag"] for r in rows}):
        group = [r for r in rows if r["tag"] == tag]
        gaps = [r["gap_closed"] for r in group if r["gap_closed"] is not None]
        by_task = {
            task: statistics.fmean(r["gap_closed"] for r in group if r["task"] == task)
            for task in {r["task"] for r in group}
        }
        worst = min(by_task.items(), key=lambda item: item[1])
        scored.append(
            (
                statistics.fmean(gaps),
                f"| {tag} | {statistics.fmean(gaps):.3f} | {worst[0]} {worst[1]:.3f} | "
                f"{statistics.fmean(r['kl_end'] for r in group):.2f} | "
                f"{statistics.fmean(r['win_rate'] for r in group):.3f} | {len(group)} |",
            )
        )
    return "\n".join(lines + [line for _, line in sorted(scored, reverse=True)])


if __name__ == "__main__":
    main()
