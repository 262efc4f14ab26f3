"""The alignment tax of finished pipelines, measured on text that no stage trained on.

`fastrlhf ppo` reports the perplexity rise on the held-out tenth of its pretraining text: 20 lines of
the bundled data, which the SFT stage saw the rest of. This script takes finished `fastrlhf pipeline`
output directories and measures, for the SFT policy and each step-3 run's final policy, the perplexity
of one text:

- ``--text unseen`` (default): the bundled synthetic world's facts that are *not* in the bundled
  pretraining text (``fastrlhf.data.synthetic.facts()`` less ``ptx.jsonl``, about 300 lines), so no
  stage ever trained on a line of it;
- ``--text held-out``: the 20 lines `fastrlhf ppo` itself uses (a check that this script agrees with it);
- or a ``{"text"}`` JSONL path.

It prints, per pipeline and on average, each run's perplexity and its rise over the SFT policy.

    python bench/alignment_tax.py runs/pipeline-seed0 runs/pipeline-seed1 runs/pipeline-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

RUNS = ("ppo", "ppo-ptx")  # the step-3 runs a pipeline directory holds, next to its sft/


class _PolicyView(torch.nn.Module):
    """A causal LM seen as ``fastrlhf.train.evaluation.text_perplexity`` wants it:
    ``forward(value_rows, head_fn, **inputs) -> (head_fn(hidden[B, T, H], lm_head), None)``, as
    ``ActorCritic.forward`` gives it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, value_rows: int = 0, head_fn=None, **inputs):
        hidden = self.lm.base_model(**(inputs | {"use_cache": False})).last_hidden_state
        return head_fn(hidden, self.lm.get_output_embeddings()), None


def text_file(choice: str, directory: Path) -> str:
    """The JSONL path of ``--text``."""
    from fastrlhf.data import synthetic
    from fastrlhf.data.bundled import data_path

    if choice not in ("unseen", "held-out"):
        return choice
    bundled = data_path("sample", "ptx", "ptx_data")
    if choice == "held-out":
        return str(bundled)
    with open(bundled, encoding="utf-8") as fh:
        seen = {json.loads(line)["text"] for line in fh}
    path = directory / "unseen.jsonl"
    synthetic.write_jsonl(str(path), [{"text": fact} for fact in synthetic.facts() if fact not in seen])
    return str(path)


def perplexities(pipeline: Path, text: str, held_out_only: bool) -> dict[str, float]:
    """Perplexity of ``text`` under the SFT policy and each finished step-3 run of ``pipeline``."""
    from fastrlhf.data.readers import read_jsonl
    from fastrlhf.data.tokenize import tokenize_texts
    from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
    from fastrlhf.train.datasets import split_texts
    from fastrlhf.train.evaluation import text_perplexity

    models = {"sft": pipeline / "sft" / "model"}
    models |= {run: pipeline / run / "model" for run in RUNS if (pipeline / run / "summary.json").exists()}
    tokenizer = load_tokenizer(str(models["sft"]))
    if held_out_only:
        _, sequences = split_texts(text, text, tokenizer)
    else:
        sequences, _ = tokenize_texts(read_jsonl(text, "ptx"), tokenizer, 128)
    result = {}
    for name, path in models.items():
        lm = load_causal_lm(str(path), ModelOptions(dtype="float32"))
        result[name] = text_perplexity(_PolicyView(lm), sequences, tokenizer.pad_token_id, 32, "cpu")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipelines", nargs="+", type=Path, help="finished `fastrlhf pipeline` outputs")
    parser.add_argument("--text", default="unseen", help='unseen, held-out, or a {"text"} JSONL path')
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text = text_file(args.text, Path(tmp))
        table = {str(p): perplexities(p, text, args.text == "held-out") for p in args.pipelines}
    rises: dict[str, list[float]] = {}
    print(f"text: {args.text}\n\n| pipeline | " + " | ".join(("sft", *RUNS)) + " |\n|---|---|---|---|")
    for pipeline, figures in table.items():
        cells = [f"{figures['sft']:.3f}"]
        for run in RUNS:
            if run in figures:
                rise = figures[run] - figures["sft"]
                rises.setdefault(run, []).append(rise)
                cells.append(f"{figures[run]:.3f} ({rise:+.3f})")
            else:
                cells.append("n/a")
        print(f"| {pipeline} | " + " | ".join(cells) + " |")
    print()
    for run, values in rises.items():
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"{run}: mean perplexity rise over the SFT policy {statistics.fmean(values):+.3f}{spread}")


if __name__ == "__main__":
    sys.exit(main())
