"""Which causal-LM architectures every command runs on: sft, rm, ppo in each actor/critic mode, generate
and score, end to end, on tiny configs of each architecture (``fastrlhf.models.architectures``), with
tied and untied embeddings.

Each cell runs the command itself (its config parsed from flags, as the CLI does) on a few lines of the
bundled data, and records ✓ or the first line of the error it raised. A cell whose input could not be
made (ppo without an rm) says so. What a cell proves is that the command finishes and writes finite
outputs; the numerics per architecture are tested in ``tests/test_architectures.py`` against transformers'
own forward.

    python bench/architectures.py                          # 7 architectures x tied/untied, ~5 min
    python bench/architectures.py --architectures gpt2,gemma --embeddings tied

Output: the markdown table (for docs/compat.md), and rows in ``bench/results/architectures.csv``
(architecture, embeddings, command, result, machine, date, versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CELLS = ("sft", "rm", "ppo separate", "ppo shared", "ppo lora", "generate", "score")
SIZES = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
)
LINES = {"sft": 24, "rm": 12, "ppo": 8}
EVAL_PROMPTS = 4
OK = "✓"


def small_data(root: Path) -> dict[str, str]:
    """The first lines of each bundled sample file, and a few held-out PPO prompts."""
    from fastrlhf.data import synthetic

    paths = {}
    for kind, count in LINES.items():
        lines = Path(synthetic.SAMPLE_DIR, f"{kind}.jsonl").read_text().splitlines()
        paths[kind] = str(root / f"{kind}.jsonl")
        Path(paths[kind]).write_text("\n".join(lines[:count]) + "\n")
        if kind == "ppo":
            paths["eval"] = str(root / "eval.jsonl")
            Path(paths["eval"]).write_text("\n".join(lines[count : count + EVAL_PROMPTS]) + "\n")
    return paths


def command_flags(cell: str, model: Path, run: Path, data: dict[str, str]) -> tuple[str, dict]:
    """``(command, flags)`` of one cell; ``run`` holds the chain's earlier outputs, ``model`` the model the
    later cells start from (the SFT output, or the base model when sft could not run)."""
    # Two-step runs: no plots (a dozen PNGs of two points each would cost more than the steps).
    short = dict(max_steps=2, eval_every=0, plots=False)
    if cell == "sft":
        return "sft", dict(model=model, data=data["sft"], batch_size=8, **short)
    if cell == "rm":
        return "rm", dict(model=model, data=data["rm"], batch_size=4, **short)
    if cell.startswith("ppo"):
        mode = cell.split()[1]
        flags = dict(
            policy=model,
            reward_model=run / "rm",
            prompts=data["ppo"],
            eval_prompts=data["eval"],
            actor_critic=mode,
            steps=1,
            rollout_batch_size=4,
            minibatch_size=4,
            ppo_epochs=1,
            max_new_tokens=8,
            eval_samples=1,
            eval_max_new_tokens=8,
            plots=False,
        )
        return "ppo", flags
    if cell == "generate":
        return "generate", dict(model=model, prompts=data["eval"], max_new_tokens=8)
    if cell == "score":
        return "score", dict(reward_model=run / "rm", data=run / "generate.jsonl")
    raise ValueError(cell)


NEEDS = {"ppo separate": ("rm",), "ppo shared": ("rm",), "ppo lora": ("rm",), "score": ("rm", "generate")}


def run_cell(command: str, flags: dict) -> str:
    """Run one command in this process; ✓, or the first line of what it raised."""
    from accelerate.state import AcceleratorState

    from fastrlhf.cli import COMMANDS
    from fastrlhf.train.config import parse_config

    argv = []
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        entry = COMMANDS[command]
        entry.run_function()(parse_config(entry.config_class(), argv, prog=f"fastrlhf {command}"))
    except Exception as error:  # noqa: BLE001 - the cell reports whatever stopped the command
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        # The cell's reason: the first clause, without the run's temporary paths.
        text = re.sub(r"model '[^']*' ", "", text.split(";")[0])
        return f"{type(error).__name__}: {text}"[:200]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return OK


def check_outputs(cell: str, run: Path) -> str:
    """✓ when the cell's outputs are there and finite."""
    if cell in ("sft", "rm") or cell.startswith("ppo"):
        summary = json.loads((run / cell.replace(" ", "-") / "summary.json").read_text())
        bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
        return OK if not bad else f"non-finite in the summary: {bad}"
    key = {"generate": "response", "score": "reward"}[cell]
    lines = [json.loads(line) for line in (run / f"{cell}.jsonl").read_text().splitlines()]
    if not lines:
        return f"{cell} wrote no lines"
    if cell == "score" and not all(math.isfinite(line[key]) for line in lines):
        return "non-finite rewards"
    return OK


def run_chain(architecture: str, tied: bool, root: Path, data: dict[str, str]) -> dict[str, str]:
    """Every cell for one architecture and embedding choice; ``{cell: ✓ or the reason}``."""
    from fastrlhf.models.tiny import build_tiny_model

    name = f"{architecture}-{'tied' if tied else 'untied'}"
    model = Path(
        build_tiny_model(
            root / name / "base", seed=0, architecture=architecture, tie_word_embeddings=tied, **SIZES
        )
    )
    run = root / name
    results: dict[str, str] = {}
    for cell in CELLS:
        missing = [needed for needed in NEEDS.get(cell, ()) if results.get(needed) != OK]
        if missing:
            results[cell] = f"needs {' and '.join(missing)}"
            continue
        start = run / "sft" if results.get("sft") == OK else model
        command, flags = command_flags(cell, start, run, data)
        output = run / (f"{cell}.jsonl" if cell in ("generate", "score") else cell.replace(" ", "-"))
        flags["output"] = output
        result = run_cell(command, flags)
        results[cell] = check_outputs(cell, run) if result == OK else result
    return results


def machine_row() -> dict:
    import torch
    import transformers
    from common import device_name

    from fastrlhf import __version__

    return {
        "machine": device_name("cpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "fastrlhf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    from fastrlhf.models.architectures import ARCHITECTURES
    from fastrlhf.train.run import quiet_libraries

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--embeddings", choices=("both", "tied", "untied"), default="both")
    parser.add_argument("--csv", default=str(HERE / "results" / "architectures.csv"))
    args = parser.parse_args(argv)
    quiet_libraries()
    ties = {"both": (False, True), "tied": (True,), "untied": (False,)}[args.embeddings]
    machine = machine_row()
    rows, table = [], []
    with tempfile.TemporaryDirectory(prefix="fastrlhf-architectures-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("FASTRLHF_HOME", str(root / "home"))
        data = small_data(root)
        for architecture in args.architectures.split(","):
            for tied in ties:
                results = run_chain(architecture, tied, root, data)
                embeddings = "tied" if tied else "untied"
                table.append([architecture, embeddings] + [results[c] for c in CELLS])
                for cell in CELLS:
                    rows.append(
                        dict(
                            architecture=architecture,
                            embeddings=embeddings,
                            command=cell,
                            result=results[cell],
                            **machine,
                        )
                    )
                print(
                    f"{architecture} {embeddings}: " + ", ".join(f"{c} {results[c]}" for c in CELLS),
                    file=sys.stderr,
                    flush=True,
                )
    from common import write_csv

    write_csv(rows, args.csv, columns=list(rows[0]))
    print(
        f"\n{machine['machine']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"{machine['date']}\n"
    )
    print("| architecture | embeddings | " + " | ".join(CELLS) + " |")
    print("|" + "---|" * (len(CELLS) + 2))
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
