"""``fastrlhf pipeline``: the three steps of InstructGPT on one model and dataset, into one directory.

``<output>/sft`` (step 1) -> ``<output>/rm`` (step 2, from the SFT trunk) -> ``<output>/ppo`` (step 3,
PPO against the RM, KL to the SFT policy) and ``<output>/ppo-ptx`` (the same with PPO-ptx), then a
summary table (``summary.md``, ``summary.json``) and an overview plot (``pipeline.png``). Each stage's own
run directory holds its metrics, plots, checkpoints and model. A stage whose summary already exists is
reused, so an interrupted pipeline restarts where it stopped.

With the bundled data the world's known preference ("gold") scores the held-out responses of the SFT and
the PPO policies, so the table shows what PPO really improved, not only what the reward model says.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from fastrlhf.errors import InputError
from fastrlhf.train.arguments import OPTIMIZERS, InputOptions, flag
from fastrlhf.train.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PipelineConfig(InputOptions):
    output: str = flag("runs/pipeline", "Directory of the whole pipeline (one sub-directory per stage).")
    model: str = flag("tiny", "The base model: a local HF causal LM directory, or 'tiny'.")
    sft_data: str = flag("sample", "SFT demonstrations JSONL; 'sample' = bundled.")
    rm_data: str = flag("sample", "Ranked responses JSONL; 'sample' = bundled.")
    prompts: str = flag("sample", "PPO prompts JSONL; 'sample' = bundled.")
    ptx_data: str = flag(
        "sample",
        "Pretraining text JSONL, learnt next to the demonstrations in SFT (tiny has no pretraining), "
        "mixed into PPO-ptx, and held out in part for the perplexity; 'sample' = bundled.",
    )
    gold_reward_fn: str | None = flag(
        None,
        "The ground truth module:function scoring held-out responses (never trained on); default: the "
        "bundled world's known preference when --prompts is 'sample'.",
    )
    sft_epochs: int = flag(
        40,
        "SFT epochs: the tiny model needs many passes over 400 demonstrations before it restates unseen "
        "questions right (held-out greedy gold score after 20 epochs 0.31-0.52, after 40 0.54-0.75).",
    )
    sft_learning_rate: float = flag(2e-3, "SFT peak learning rate.")
    rm_epochs: int = flag(2, "Reward-model epochs (InstructGPT: 1; the small RM data needs 2).")
    rm_learning_rate: float = flag(1e-3, "Reward-model peak learning rate.")
    ppo_steps: int | None = flag(None, "PPO steps of each PPO run (default: `fastrlhf ppo`'s).")
    max_new_tokens: int | None = flag(None, "Response tokens per rollout (default: `fastrlhf ppo`'s).")
    actor_critic: str = flag("separate", "PPO memory mode: separate, shared or lora.")
    compare_ptx: bool = flag(True, "Also run PPO without ptx, to show the alignment tax ptx pays back.")
    seed: int = flag(0, "Seed of every stage.")
    optimizer: str = flag(
        "auto",
        "Optimizer of every stage: auto (adamw8bit on a GPU, adamw on CPU), adamw8bit, paged_adamw8bit or "
        "adamw (torch).",
    )

    def __post_init__(self):
        # Refused before the first stage starts, not when SFT parses its flags.
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")


def run_stage(directory: Path, train, config_cls, prog: str, **flags) -> dict:
    """Run one trainer into ``directory`` with ``flags`` (``--name value``), or return its summary when the
    directory already holds a finished run; an interrupted one is resumed from its last checkpoint."""
    from accelerate.state import AcceleratorState

    from fastrlhf.train.config import parse_config

    summary_path = directory / "summary.json"
    if summary_path.exists():
        log.info("%s: reusing the finished run", directory)
        return json.loads(summary_path.read_text())
    argv = []
    for key, value in {"output": str(directory), **flags}.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if directory.exists() and any(directory.glob("checkpoint-*")):
        argv += ["--resume", "true"]
    # Each stage builds its own Accelerator; the process-wide state of the previous one must go.
    AcceleratorState._reset_state(reset_partial_state=True)
    return train(parse_config(config_cls, argv, prog=prog))


def run_pipeline_command(config: PipelineConfig) -> None:
    """``fastrlhf pipeline``: run it; the table it prints is the output (the summaries are in the run
    directory), so the command prints nothing more."""
    run_pipeline(config)


def run_pipeline(config: PipelineConfig) -> dict:
    """Run the stages (reusing finished ones); returns the summary and prints the table."""
    from fastrlhf.data.tasks import BUNDLED_TASK, gold_reward_spec
    from fastrlhf.train.ppo import PPOConfig, train_ppo
    from fastrlhf.train.rm import RMConfig, train_rm
    from fastrlhf.train.sft import SFTConfig, train_sft

    root = Path(config.output)
    root.mkdir(parents=True, exist_ok=True)
    prog = "fastrlhf pipeline"
    common = {"seed": config.seed, "optimizer": config.optimizer}
    sft = run_stage(
        root / "sft",
        train_sft,
        SFTConfig,
        prog,
        model=config.model,
        data=config.sft_data,
        ptx_data=config.ptx_data,
        epochs=config.sft_epochs,
        learning_rate=config.sft_learning_rate,
        **common,
    )
    rm = run_stage(
        root / "rm",
        train_rm,
        RMConfig,
        prog,
        model=str(root / "sft"),
        data=config.rm_data,
        sft_data=config.sft_data,
        epochs=config.rm_epochs,
        learning_rate=config.rm_learning_rate,
        **common,
    )
    gold = config.gold_reward_fn
    if gold is None and config.prompts == "sample":
        gold = gold_reward_spec(BUNDLED_TASK)
    ppo_flags = dict(
        policy=str(root / "sft"),
        reward_model=str(root / "rm"),
        prompts=config.prompts,
        eval_text=config.ptx_data,
        steps=config.ppo_steps,
        max_new_tokens=config.max_new_tokens,
        eval_max_new_tokens=config.max_new_tokens,
        actor_critic=config.actor_critic,
        eval_reward_fn=gold,
        **common,
    )
    runs = {}
    if config.compare_ptx:
        runs["ppo"] = run_stage(root / "ppo", train_ppo, PPOConfig, prog, **ppo_flags)
    runs["ppo-ptx"] = run_stage(
        root / "ppo-ptx", train_ppo, PPOConfig, prog, ptx_data=config.ptx_data, **ppo_flags
    )

    summary = {
        "sft": _pick(sft, "eval_loss_start", "eval_loss_end", "seconds"),
        "rm": _pick(rm, "eval_accuracy_start", "eval_accuracy_end", "normalization_bias", "seconds"),
        **{name: ppo_figures(s) for name, s in runs.items()},
    }
    summary["seconds"] = round(sum(part.get("seconds") or 0 for part in summary.values()), 1)
    table = summary_table(summary)
    atomic_write_json(root / "summary.json", summary)
    atomic_write_text(root / "summary.md", table + "\n")
    from fastrlhf.train.plots import plot_panels

    panels = [
        ("SFT loss", root / "sft" / "metrics.jsonl", ["train/loss", "eval/loss"]),
        ("RM pairwise accuracy", root / "rm" / "metrics.jsonl", ["train/accuracy", "eval/accuracy"]),
    ]
    curves = ["score/mean", "gold/mean", "kl/ref"]
    panels += [(f"{name}: RM score, gold, KL", root / name / "metrics.jsonl", curves) for name in runs]
    plot_panels(panels, root / "pipeline.png")
    print(table)
    return summary


def ppo_figures(summary: dict) -> dict:
    """The start → end figures of a PPO run's summary that the table and the benchmark report, and the
    share of the gap between the SFT policy's held-out gold score and the best score that PPO closed."""
    figures = _pick(
        summary,
        "score_start",
        "score_end",
        "kl_end",
        "eval_sampled_rm_start",
        "eval_sampled_rm_end",
        "eval_sampled_gold_start",
        "eval_sampled_gold_end",
        "eval_greedy_gold_start",
        "eval_greedy_gold_end",
        "eval_sampled_win_rate",
        "eval_sampled_judge",
        "eval_perplexity_start",
        "eval_perplexity_end",
        "eval_text_kl_start",
        "eval_text_kl_end",
        "seconds",
    )
    figures["gap_closed"] = gap_closed(figures["eval_sampled_gold_start"], figures["eval_sampled_gold_end"])
    return figures


def gap_closed(start: float | None, end: float | None, best: float = 1.0) -> float | None:
    """``(end - start) / (best - start)``: the share of the way from the SFT policy's score to the best
    response's score that PPO went (negative when it got worse)."""
    if start is None or end is None or not best > start:
        return None
    return (end - start) / (best - start)


def _pick(summary: dict, *keys: str) -> dict:
    return {key: summary.get(key) for key in keys}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def summary_table(summary: dict) -> str:
    """The pipeline's results as a markdown table: one row per quantity, with its start and end."""
    rows = []

    def row(step: str, quantity: str, start, end, digits: int = 3) -> None:
        start = start if isinstance(start, str) else _fmt(start, digits)
        rows.append(f"| {step} | {quantity} | {start} | {_fmt(end, digits)} |")

    sft, rm = summary["sft"], summary["rm"]
    row("SFT", "held-out loss (nats/token)", sft["eval_loss_start"], sft["eval_loss_end"])
    row("RM", "held-out pairwise accuracy", rm["eval_accuracy_start"], rm["eval_accuracy_end"])
    for name in ("ppo", "ppo-ptx"):
        if name not in summary:
            continue
        part, label = summary[name], name.upper()
        row(label, "mean RM score of the rollouts", part["score_start"], part["score_end"])
        row(label, "KL to the SFT policy (nats/response)", "0", part["kl_end"])
        row(
            label,
            "held-out sampled responses: mean RM score, SFT -> PPO",
            part["eval_sampled_rm_start"],
            part["eval_sampled_rm_end"],
        )
        if part.get("eval_sampled_gold_start") is not None:
            row(
                label,
                "held-out sampled responses: gold score (known preference, 0-1)",
                part["eval_sampled_gold_start"],
                part["eval_sampled_gold_end"],
            )
            row(label, "share of the SFT -> best gold gap closed", "", part["gap_closed"])
            row(
                label,
                "held-out greedy responses: gold score",
                part["eval_greedy_gold_start"],
                part["eval_greedy_gold_end"],
            )
        judge = "gold" if part.get("eval_sampled_judge") == "gold" else "RM"
        row(label, f"held-out win rate of PPO over SFT ({judge} as judge)", "", part["eval_sampled_win_rate"])
        row(
            label,
            "held-out text perplexity (the alignment tax)",
            part["eval_perplexity_start"],
            part["eval_perplexity_end"],
            digits=4,
        )
        row(label, "held-out text: KL to the SFT policy (nats/token)", "0", part.get("eval_text_kl_end"))
    header = ["| step | quantity | start | end |", "|---|---|---|---|"]
    return "\n".join(header + rows + [f"\nTotal time: {summary['seconds']} s"])
