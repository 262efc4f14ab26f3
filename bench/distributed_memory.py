"""Peak per-process memory of `fastrlhf sft` or `ppo` under DDP, FSDP2 and DeepSpeed ZeRO-2/3, two processes.

    python bench/distributed_memory.py                 # a ~60M-parameter Llama, AdamW, 4 steps of SFT
    python bench/distributed_memory.py --hidden 768 --layers 12
    python bench/distributed_memory.py --command ppo --steps 2   # PPO, separate mode, rule reward

PPO runs the same model as the policy (and its frozen reference, and a critic started from its trunk),
``--reward-model none`` with the bundled world's gold function as the reward, so no reward model is
held; under FSDP2 the reference is sharded too (``--shard-frozen-above-mib 0``).

The model (58M parameters by default) is built locally from a config, with tiny's tokenizer and
vocabulary at larger sizes, so that its parameters, gradients and AdamW state (16 bytes per fp32
parameter) dominate. Each engine runs the same command through the shipped launcher config
(``examples/accelerate/ddp.yaml``, ``fsdp2.yaml``, ``zero2.yaml``, ``zero3.yaml``; the ZeRO rows
need ``deepspeed`` installed and are left out without it). The run's own summary reports every process's peak
(CPU: peak resident set; GPU: peak allocated) and, on CPU, its resident set when the run started
(torch and the libraries, before any model). Both the raw peak and the peak above that start are
compared, since on CPU the start (~0.45 GiB here) is paid whatever the engine.

Output: a markdown table, and rows appended to ``bench/results/distributed_memory.csv`` naming the machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "examples" / "accelerate"
# (label, launcher config, extra environment). FSDP2 and ZeRO on CPU pin glibc's mmap threshold
# themselves (fastrlhf.train.sharding.release_freed_memory_to_the_os); DDP is measured both as it ships
# and with the same threshold, so the comparison is not one of allocators.
ENGINES = [
    ("DDP", CONFIGS / "ddp.yaml", {}),
    ("DDP, MALLOC_MMAP_THRESHOLD_=131072", CONFIGS / "ddp.yaml", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    ("FSDP2", CONFIGS / "fsdp2.yaml", {}),
]
if importlib.util.find_spec("deepspeed"):
    ENGINES += [(f"DeepSpeed ZeRO-{stage}", CONFIGS / f"zero{stage}.yaml", {}) for stage in (2, 3)]


def build_model(directory: Path, hidden: int, layers: int) -> tuple[str, int]:
    """A Llama of ``layers`` x ``hidden`` with tiny's vocabulary, saved as an HF directory; returns
    (directory, parameter count)."""
    from fastrlhf.models.tiny import build_tiny_model

    path = build_tiny_model(
        directory,
        seed=0,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 64, 1),
    )
    import math

    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        count = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return path, count


def command_flags(command: str, model: str, steps: int, batch_size: int) -> list[str]:
    """The trainer's arguments: SFT on the bundled demonstrations, or PPO in separate mode."""
    if command == "sft":
        flags = ["sft", "--model", model, "--max-steps", str(steps), "--batch-size", str(batch_size)]
    else:
        flags = ["ppo", "--policy", model, "--reward-model", "none"]
        flags += ["--reward-fn", "fastrlhf.data.tasks.refusal:gold_reward", "--steps", str(steps)]
        flags += ["--rollout-batch-size", str(batch_size), "--max-new-tokens", "16"]
        flags += ["--eval-samples", "1", "--eval-max-new-tokens", "8", "--shard-frozen-above-mib", "0"]
    # The end-of-run checkpoint only.
    return flags + ["--optimizer", "adamw", "--save-every", str(steps + 1), "--plots", "false"]


def run_engine(config: Path, extra_env: dict, flags: list[str], output: Path) -> dict:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    argv += ["-m", "fastrlhf.cli", *flags, "--output", str(output)]
    env = {**os.environ, **extra_env}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{config.name} failed:\n{result.stderr[-4000:]}")
    return json.loads((output / "summary.json").read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=("sft", "ppo"), default="sft")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--csv", default=str(HERE / "results" / "distributed_memory.csv"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    import torch
    from common import device_name, write_csv

    from fastrlhf import __version__

    machine = device_name("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastrlhf-distributed-memory-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("FASTRLHF_HOME", str(root / "home"))
        model, parameters = build_model(root / "model", args.hidden, args.layers)
        for index, (engine, config, extra_env) in enumerate(ENGINES):
            flags = command_flags(args.command, model, args.steps, args.batch_size)
            summary = run_engine(config, extra_env, flags, root / f"run{index}")
            peaks = summary["peak_memory_mib_per_process"]
            starts = summary["start_memory_mib_per_process"]
            rows.append(
                {
                    "engine": engine,
                    "distributed_type": summary["distributed_type"],
                    "processes": summary["processes"],
                    "parameters": parameters,
                    "peak_mib_max": max(peaks),
                    "above_start_mib_max": round(max(p - s for p, s in zip(peaks, starts, strict=True)), 1),
                    "peaks_mib": " ".join(f"{p:.0f}" for p in peaks),
                    "seconds": summary["seconds"],
                    "machine": machine,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                    "fastrlhf": __version__,
                    "torch": torch.__version__,
                    "command": args.command,
                }
            )
    ddp = rows[0]
    size = f"{parameters / 1e6:.1f}M parameters"
    print(f"\n{args.command}, {size}, AdamW fp32, {args.steps} steps; {machine}\n")
    print("| engine | peak per process (MiB) | vs DDP | above the run's start (MiB) | vs DDP | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['engine']} | {row['peak_mib_max']:.0f} ({row['peaks_mib']}) | "
            f"{row['peak_mib_max'] / ddp['peak_mib_max']:.2f}x | {row['above_start_mib_max']:.0f} | "
            f"{row['above_start_mib_max'] / ddp['above_start_mib_max']:.2f}x | {row['seconds']:.1f} |"
        )
    write_csv(rows, args.csv, columns=list(rows[0]))


if __name__ == "__main__":
    main()
