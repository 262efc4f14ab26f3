"""Alignment benchmark: does step 3 raise the score we actually care about, on tasks whose preference we know?

For each synthetic task (``fastrlhf.data.tasks``: refusal, concise, format; content on request) and seed,
on fresh data drawn for that seed: SFT -> reward model -> each method of step 3 from the same SFT policy
and RM.
The reward model learns from the task's hand-written ranked tiers; ``--comparisons policy`` adds, as in
InstructGPT, the SFT policy's own samples on the RM prompts ranked by the task's labeler.

| method | what runs |
|---|---|
| ``ppo`` | ``fastrlhf ppo`` with its defaults (GAE, a critic) |
| ``ppo-ptx`` | the same plus PPO-ptx on the task's pretraining text |
| ``grpo`` / ``rloo`` | ``--advantage-estimator grpo`` / ``rloo``, k = 4 samples per prompt, no critic |

Each run is judged on held-out prompts (prompt texts never trained on) by the task's gold reward, which
no stage optimises directly (it only stands in for the labelers who rank comparisons): the mean gold score
of responses sampled at the training temperature, before
(the SFT policy) and after; the share of the gap from the SFT policy's score to the best score (1.0) that
the run closed; the KL to the SFT policy per response; the rise of the held-out text's perplexity and
the policy's KL to the SFT policy on that text per token (the alignment tax, as a rise and as drift).

Output: one table (mean ± std over seeds) printed last, the rows appended to a CSV
(``bench/results/alignment.csv``: task, seed, method, figures, flags, machine, date, version), and a PNG of
the training rollouts' gold score against their KL, per task and method: the over-optimisation frontier.

    python bench/alignment.py                        # 3 tasks x 4 methods x 5 seeds (~2 hours on 2 cores)
    python bench/alignment.py --tasks refusal --seeds 0 --methods ppo,grpo
    python bench/alignment.py --workers 2            # units in parallel, one thread each
    python bench/alignment.py --set learning_rate=3e-4 --tag lr3e-4   # a sweep point
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TASK_NAMES = ("refusal", "concise", "format", "content")
# The tasks whose preference is about behaviour, which RLHF can reward; `content` (facts the tiny model
# lacks) runs on request: it measures the expected failure (docs/alignment.md).
DEFAULT_TASKS = ("refusal", "concise", "format")
# Five seeds: one run's gap closed spreads 0.03-0.31 (std over seeds) by task, so three seeds leave the
# mean uncertain by ~0.1-0.18, as much as the targets' margins.
DEFAULT_SEEDS = "0,1,2,3,4"
METHODS = {
    "ppo": {},
    "ppo-ptx": {"ptx_data": "{ptx}"},
    "grpo": {"advantage_estimator": "grpo", "samples_per_prompt": 4, "rollout_batch_size": 8},
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 4, "rollout_batch_size": 8},
}
HELD_OUT_FRACTION = 0.2  # of the distinct prompt texts, never trained on
# Sampled answers per held-out prompt in the start and end evaluations. With `fastrlhf ppo`'s default (4),
# 40 held-out prompts give 160 answers; gold scores spread ~0.3, so each end's mean carries ~0.025 of
# sampling error and one run's gap closed ~0.1 (the gap is ~0.3 wide): as large as the differences the
# table compares. 16 halves that for ~10 s of generation per evaluation.
EVAL_SAMPLES = 16
POLICY_SAMPLES_PER_PROMPT = 4  # K of the SFT policy's samples ranked per RM prompt (InstructGPT: 4-9)
CSV_COLUMNS = [
    "task",
    "seed",
    "method",
    "tag",
    "rm_data",
    "rm_accuracy",
    "gold_start",
    "gold_end",
    "gap_closed",
    "greedy_gold_start",
    "greedy_gold_end",
    "win_rate",
    "rm_score_start",
    "rm_score_end",
    "kl_end",
    "perplexity_start",
    "perplexity_end",
    "perplexity_rise",
    "text_kl_end",
    "seconds",
    "flags",
    "device",
    "date",
    "fastrlhf_version",
]


def prepare_data(task: str, seed: int, directory: Path) -> dict[str, str]:
    """Fresh task data for ``seed``, with the PPO prompts split by prompt text into train and held-out."""
    from fastrlhf.data.synthetic import write_jsonl
    from fastrlhf.data.tasks import write_task_data

    paths = write_task_data(task, directory, seed)
    with open(paths["ppo"], encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    texts = sorted({line["prompt"] for line in lines})
    count = max(1, round(HELD_OUT_FRACTION * len(texts)))
    held = set(random.Random(f"held-out:{task}:{seed}").sample(texts, count))
    paths["ppo_train"] = str(directory / "ppo_train.jsonl")
    paths["ppo_eval"] = str(directory / "ppo_eval.jsonl")
    write_jsonl(paths["ppo_train"], [line for line in lines if line["prompt"] not in held])
    eval_lines = {line["prompt"]: line for line in lines if line["prompt"] in held}
    write_jsonl(paths["ppo_eval"], list(eval_lines.values()))
    return paths


def label_policy_samples(unit: Path, data: dict[str, str], task: str, seed: int, max_tokens: int) -> str:
    """The reward model's data the InstructGPT way: the hand-written ranked tiers plus the SFT policy's own
    samples on the RM prompts, ranked by the task's labeler (its known preference standing in for human
    labelers). Returns the path of the merged file; a finished one is reused.

    The tiers alone never show the reward model the policy's own mistakes (a fluent answer about the wrong
    subject, say): it scores them high and PPO drifts into them. Held-out prompt texts are never sampled."""
    from fastrlhf.commands import LabelConfig, run_label
    from fastrlhf.data.synthetic import write_jsonl
    from fastrlhf.data.tasks import gold_reward_spec

    merged = unit / "data" / "rm_policy.jsonl"
    if merged.exists():
        return str(merged)
    with open(data["rm"], encoding="utf-8") as fh:
        tiers = [json.loads(line) for line in fh]
    with open(data["ppo_eval"], encoding="utf-8") as fh:
        held = {json.loads(line)["prompt"] for line in fh}
    prompts = {line["prompt"]: line for line in tiers if line["prompt"] not in held}  # one line per text
    prompt_file = unit / "data" / "rm_prompts.jsonl"
    users = {p: {"user": line["user"]} if line.get("user") else {} for p, line in prompts.items()}
    write_jsonl(str(prompt_file), [{"prompt": p} | users[p] for p in prompts])
    sampled = unit / "data" / "rm_policy_samples.jsonl"
    run_label(
        LabelConfig(
            model=str(unit / "sft"),
            prompts=str(prompt_file),
            labeler=gold_reward_spec(task),
            output=str(sampled),
            samples_per_prompt=POLICY_SAMPLES_PER_PROMPT,
            max_new_tokens=max_tokens,
            seed=seed,
        )
    )
    with open(sampled, encoding="utf-8") as fh:
        labelled = [json.loads(line) for line in fh]
    write_jsonl(str(merged), tiers + labelled)
    return str(merged)


def run_unit(
    task: str, seed: int, methods: list[str], root: Path, overrides: dict, tag: str, comparisons: str
) -> list[dict]:
    """SFT -> RM -> every method for one task and seed; returns one result row per method.

    ``comparisons``: the reward model's data, ``tiers`` (the task's hand-written ranked responses) or
    ``policy`` (those plus the SFT policy's own samples ranked by the labeler: ``label_policy_samples``)."""
    from fastrlhf.data.tasks import gold_reward_spec, task_module
    from fastrlhf.train.pipeline import PipelineConfig, ppo_figures, run_stage
    from fastrlhf.train.ppo import PPOConfig, train_ppo
    from fastrlhf.train.rm import RMConfig, train_rm
    from fastrlhf.train.sft import SFTConfig, train_sft

    unit = root / task / f"seed{seed}"
    data = prepare_data(task, seed, unit / "data")
    stages = PipelineConfig()  # the pipeline's SFT and RM settings: one home for them
    prog = "bench/alignment.py"
    sft = run_stage(
        unit / "sft",
        train_sft,
        SFTConfig,
        prog,
        model="tiny",
        data=data["sft"],
        ptx_data=data["ptx"],
        seed=seed,
        epochs=stages.sft_epochs,
        learning_rate=stages.sft_learning_rate,
    )
    max_tokens = task_module(task).MAX_NEW_TOKENS
    rm_data, rm_dir = data["rm"], unit / "rm"
    if comparisons == "policy":
        rm_data, rm_dir = label_policy_samples(unit, data, task, seed, max_tokens), unit / "rm-policy"
    rm = run_stage(
        rm_dir,
        train_rm,
        RMConfig,
        prog,
        model=str(unit / "sft"),
        data=rm_data,
        sft_data=data["sft"],
        seed=seed,
        epochs=stages.rm_epochs,
        learning_rate=stages.rm_learning_rate,
    )
    rows = []
    for method in methods:
        flags = {
            "policy": str(unit / "sft"),
            "reward_model": str(rm_dir),
            "prompts": data["ppo_train"],
            "eval_prompts": data["ppo_eval"],
            "eval_text": data["ptx"],
            "eval_reward_fn": gold_reward_spec(task),
            "max_new_tokens": max_tokens,
            "eval_max_new_tokens": max_tokens,
            "eval_samples": EVAL_SAMPLES,
            "seed": seed,
            **{k: v.format(**data) if isinstance(v, str) else v for k, v in METHODS[method].items()},
            **overrides,
        }
        suffix = ([tag] if tag else []) + (["rm-policy"] if comparisons == "policy" else [])
        name = "-".join([method, *suffix])
        summary = run_stage(unit / name, train_ppo, PPOConfig, prog, **flags)
        figures = ppo_figures(summary)
        start_ppl, end_ppl = figures["eval_perplexity_start"], figures["eval_perplexity_end"]
        rows.append(
            {
                "task": task,
                "seed": seed,
                "method": method,
                "tag": tag,
                "rm_data": comparisons,
                "rm_accuracy": rm.get("eval_accuracy_end"),
                "gold_start": figures["eval_sampled_gold_start"],
                "gold_end": figures["eval_sampled_gold_end"],
                "gap_closed": figures["gap_closed"],
                "greedy_gold_start": figures["eval_greedy_gold_start"],
                "greedy_gold_end": figures["eval_greedy_gold_end"],
                "win_rate": figures["eval_sampled_win_rate"],
                "rm_score_start": figures["eval_sampled_rm_start"],
                "rm_score_end": figures["eval_sampled_rm_end"],
                "kl_end": figures["kl_end"],
                "perplexity_start": start_ppl,
                "perplexity_end": end_ppl,
                "perplexity_rise": (end_ppl - start_ppl) if start_ppl and end_ppl else None,
                "text_kl_end": figures["eval_text_kl_end"],
                # The run's own time plus its share of the SFT and RM it started from.
                "seconds": round(
                    (summary.get("seconds") or 0)
                    + ((sft.get("seconds") or 0) + (rm.get("seconds") or 0)) / len(methods),
                    1,
                ),
                "flags": json.dumps(
                    {k: v for k, v in flags.items() if k not in ("policy", "reward_model")}
                    | {"run_dir": str(unit / name)}
                ),
            }
        )
    return rows


# ---- the parent: units, in parallel or not; the table, CSV and plot -----------------------------------


def run_units(args, units: list[tuple[str, int]]) -> list[dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workers <= 1:
        rows = []
        for task, seed in units:
            rows += run_unit(task, seed, args.methods, args.out, args.overrides, args.tag, args.comparisons)
        return rows
    # One child process per unit, at most ``workers`` at once, each on one thread: two torch processes
    # that each spin two OpenMP threads on two cores slow each other down 10-100x.
    pending, running, rows = list(units), [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.workers:
            task, seed = pending.pop(0)
            result = args.out / task / f"seed{seed}" / f"rows-{args.tag or 'default'}-{args.comparisons}.json"
            command = [sys.executable, __file__, "--child", task, str(seed), str(result)] + args.child_argv
            log = open(args.out / f"{task}-seed{seed}.log", "w")  # noqa: SIM115 - closed when the child ends
            child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((child, result, log))
        time.sleep(2)
        for entry in list(running):
            process, result, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode != 0:
                raise SystemExit(f"unit {result.parent} failed (exit {process.returncode}); see {log.name}")
            rows += json.loads(result.read_text())
    return rows


def mean_std(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[dict]) -> str:
    header = (
        "| task | method | RM held-out acc | gold start → end | gap closed | win rate | KL (nats) | "
        "perplexity rise | text KL (nats/token) | seconds |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    keys = sorted(
        {(r["task"], r["method"], r["tag"], r["rm_data"]) for r in rows},
        key=lambda k: (TASK_NAMES.index(k[0]), k[1:]),
    )
    for key in keys:
        task, method, tag, rm_data = key
        group = [r for r in rows if (r["task"], r["method"], r["tag"], r["rm_data"]) == key]
        variant = ([f"[{tag}]"] if tag else []) + (["(RM: + policy samples)"] if rm_data == "policy" else [])
        label = " ".join([method, *variant])
        lines.append(
            f"| {task} | {label} | {mean_std([r['rm_accuracy'] for r in group])} | "
            f"{mean_std([r['gold_start'] for r in group])} → {mean_std([r['gold_end'] for r in group])} | "
            f"{mean_std([r['gap_closed'] for r in group])} | {mean_std([r['win_rate'] for r in group])} | "
            f"{mean_std([r['kl_end'] for r in group])} | {mean_std([r['perplexity_rise'] for r in group])} | "
            f"{mean_std([r.get('text_kl_end') for r in group], digits=4)} | "
            f"{mean_std([r['seconds'] for r in group])} |"
        )
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join(lines) + f"\n\nmean ± std over seeds {seeds}; gold = the task's known preference (0-1)"


def write_csv(rows: list[dict], path: Path) -> None:
    from common import device_name
    from common import write_csv as append_rows

    from fastrlhf import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamped = [
        {**row, "device": device_name("cpu"), "date": stamp, "fastrlhf_version": __version__} for row in rows
    ]
    append_rows(stamped, str(path), CSV_COLUMNS)


def _moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Gold score of the training rollouts against their KL to the SFT policy, one line per run (a dot
    where it ended), per task and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastrlhf.train.metrics import read_metrics

    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, task in zip(axes[0], tasks, strict=True):
        for row in (r for r in rows if r["task"] == task):
            run_dir = Path(json.loads(row["flags"])["run_dir"])
            steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "gold/mean" in m]
            # Moving averages of both axes: one rollout's mean gold score and KL are noisy.
            window = max(1, len(steps) // 6)
            kl = _moving_average([m["kl/ref"] for m in steps], window)
            gold = _moving_average([m["gold/mean"] for m in steps], window)
            label = row["method"] if row["seed"] == min(r["seed"] for r in rows) else None
            colour = colours[row["method"]]
            ax.plot(kl, gold, color=colour, alpha=0.6, linewidth=1.2, label=label)
            ax.plot(kl[-1:], gold[-1:], "o", color=colour, markersize=5)  # where the run ended
        ax.set_title(task)
        ax.set_xlabel("KL to the SFT policy (nats / response)")
        ax.set_ylabel("gold score of the rollouts")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"from {', '.join(TASK_NAMES)}")
    parser.add_argument("--seeds", default=DEFAULT_SEEDS)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("runs/alignment"), help="run directories")
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "alignment.csv")
    parser.add_argument("--plot", type=Path, default=HERE / "results" / "plots" / "alignment_frontier.png")
    parser.add_argument("--workers", type=int, default=1, help="units (task, seed) run at once")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FLAG=VALUE",
        help="a `fastrlhf ppo` flag for every method (repeatable)",
    )
    parser.add_argument("--tag", default="", help="names the run directories of a --set variant")
    parser.add_argument(
        "--comparisons",
        choices=("policy", "tiers"),
        default="tiers",
        help="reward-model data: the hand-written tiers plus the SFT policy's ranked samples, or tiers only",
    )
    parser.add_argument("--child", nargs=3, metavar=("TASK", "SEED", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    for task in args.tasks:
        if task not in TASK_NAMES:
            parser.error(f"--tasks: unknown task {task!r}; choose from {', '.join(TASK_NAMES)}")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    args.overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FLAG=VALUE")
        args.overrides[key.strip().replace("-", "_")] = value
    args.child_argv = ["--methods", ",".join(args.methods), "--out", str(args.out), "--tag", args.tag]
    args.child_argv += ["--comparisons", args.comparisons]
    args.child_argv += [x for item in args.set for x in ("--set", item)]
    return args


def main(argv=None) -> None:
    import logging

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        task, seed, result = args.child
        rows = run_unit(task, int(seed), args.methods, args.out, args.overrides, args.tag, args.comparisons)
        Path(result).write_text(json.dumps(rows))
        return
    units = [(task, seed) for task in args.tasks for seed in args.seeds]
    rows = run_units(args, units)
    write_csv(rows, args.csv)
    plot_frontier(rows, args.plot)
    print(f"\nCSV: {args.csv}  plot: {args.plot}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
