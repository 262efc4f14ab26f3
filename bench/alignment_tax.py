"""The alignment tax of finished step-3 runs: perplexity and KL to the SFT policy on pretraining text.

`fastrlhf ppo` reports both on the held-out tenth of its pretraining text (20 lines of the bundled data,
which the SFT stage saw the rest of). This script takes finished run groups, each a directory with the SFT
policy in ``sft/`` and step-3 runs beside it in ``ppo*/``: a `fastrlhf pipeline` output (``ppo``,
``ppo-ptx``) or a unit of ``bench/alignment.py`` (``<out>/<task>/seed<N>``, with its variants such as
``ppo-ptx-ptx1.0``). For the SFT policy and each run's final policy it measures, on one text:

- the perplexity, and its rise over the SFT policy's;
- the mean over the text's tokens of KL(SFT policy || run) over the whole vocabulary, in nats per token
  (``fastrlhf.train.evaluation.text_kl_to_reference``): the drift of the text distribution. It does not
  cancel out, where a perplexity that fell on some lines and rose on others can.

The text (``--text``):

- ``unseen`` (default): the synthetic world's facts that are *not* in the group's pretraining text
  (``fastrlhf.data.synthetic.facts()`` less the bench unit's ``data/ptx.jsonl``, or less the bundled
  ``ptx.jsonl`` for a pipeline: about 300 lines), so no stage ever trained on a line of it;
- ``held-out``: the held-out lines `fastrlhf ppo` itself measures (a check that this script agrees);
- or a ``{"text"}`` JSONL path.

It prints one row per group and the means over groups, with each run's KL as a share of ``ppo``'s.

    python bench/alignment_tax.py runs/pipeline-seed0 runs/pipeline-seed1 runs/pipeline-seed2
    python bench/alignment_tax.py runs/alignment/format/seed* --text held-out
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch


class _PairView(torch.nn.Module):
    """A final policy and the SFT policy seen as ``fastrlhf.train.evaluation`` wants an ``ActorCritic``:
    ``forward(value_rows, head_fn, **inputs) -> (head_fn(hidden[B, T, H], lm_head), None)``, ``lm_head``
    and ``reference_hidden(**inputs) -> (hidden[B, T, H], lm_head)``."""

    def __init__(self, lm, reference_lm):
        super().__init__()
        self.lm = lm
        self.reference_lm = reference_lm

    @property
    def lm_head(self):
        return self.lm.get_output_embeddings()

    def forward(self, value_rows: int = 0, head_fn=None, **inputs):
        hidden = self.lm.base_model(**(inputs | {"use_cache": False})).last_hidden_state
        return head_fn(hidden, self.lm_head), None

    @torch.no_grad()
    def reference_hidden(self, **inputs):
        hidden = self.reference_lm.base_model(**(inputs | {"use_cache": False})).last_hidden_state
        return hidden, self.reference_lm.get_output_embeddings()


def pretraining_text(group: Path) -> Path:
    """The pretraining text a group's runs trained on: a bench unit's own, else the bundled one."""
    from fastrlhf.data.bundled import data_path

    own = group / "data" / "ptx.jsonl"
    return own if own.exists() else Path(data_path("sample", "ptx", "ptx_data"))


def unseen_facts(group: Path, directory: Path) -> str:
    """A JSONL of the synthetic world's facts that are not in ``group``'s pretraining text."""
    from fastrlhf.data import synthetic

    with open(pretraining_text(group), encoding="utf-8") as fh:
        seen = {json.loads(line)["text"] for line in fh}
    path = directory / f"unseen-{abs(hash(str(group.resolve())))}.jsonl"
    synthetic.write_jsonl(str(path), [{"text": fact} for fact in synthetic.facts() if fact not in seen])
    return str(path)


def finished_runs(group: Path) -> list[str]:
    return sorted(p.name for p in group.glob("ppo*") if (p / "summary.json").exists())


def measure(group: Path, choice: str, scratch: Path) -> dict[str, dict[str, float]]:
    """``{"sft": {"perplexity"}, run: {"perplexity", "kl"}, ...}`` of ``group`` on the ``--text`` choice."""
    from fastrlhf.data.readers import read_jsonl
    from fastrlhf.data.tokenize import tokenize_texts
    from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
    from fastrlhf.train.datasets import split_texts
    from fastrlhf.train.evaluation import text_kl_to_reference, text_perplexity

    tokenizer = load_tokenizer(str(group / "sft" / "model"))
    if choice == "held-out":
        text = str(pretraining_text(group))
        _, sequences = split_texts(text, text, tokenizer)
    else:
        text = unseen_facts(group, scratch) if choice == "unseen" else choice
        sequences, _ = tokenize_texts(read_jsonl(text, "ptx"), tokenizer, 128)
    options = ModelOptions(dtype="float32")
    sft = load_causal_lm(str(group / "sft" / "model"), options).eval()
    pad = tokenizer.pad_token_id
    result = {"sft": {"perplexity": text_perplexity(_PairView(sft, sft), sequences, pad, 32, "cpu")}}
    for run in finished_runs(group):
        view = _PairView(load_causal_lm(str(group / run / "model"), options).eval(), sft)
        result[run] = {
            "perplexity": text_perplexity(view, sequences, pad, 32, "cpu"),
            "kl": text_kl_to_reference(view, sequences, pad, 32, "cpu"),
        }
    return result


def report(table: dict[str, dict]) -> str:
    runs = sorted({run for figures in table.values() for run in figures if run != "sft"})
    lines = [
        "| group | sft perplexity | " + " | ".join(f"{run}: rise, KL" for run in runs) + " |",
        "|---" * (len(runs) + 2) + "|",
    ]
    rises: dict[str, list[float]] = {run: [] for run in runs}
    kls: dict[str, list[float]] = {run: [] for run in runs}
    shares: dict[str, list[float]] = {run: [] for run in runs}
    for group, figures in table.items():
        cells = [f"{figures['sft']['perplexity']:.3f}"]
        for run in runs:
            if run not in figures:
                cells.append("n/a")
                continue
            rise = figures[run]["perplexity"] - figures["sft"]["perplexity"]
            rises[run].append(rise)
            kls[run].append(figures[run]["kl"])
            if "ppo" in figures and figures["ppo"]["kl"] > 0:
                shares[run].append(figures[run]["kl"] / figures["ppo"]["kl"])
            cells.append(f"{rise:+.3f}, {figures[run]['kl']:.4f}")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append("")
    for run in runs:
        lines.append(
            f"{run}: perplexity rise {_mean_std(rises[run], 3, signed=True)}; KL to the SFT policy "
            f"{_mean_std(kls[run], 4)} nats/token"
            + (f", {_mean_std(shares[run], 2)} of ppo's (per group)" if shares[run] else "")
        )
    return "\n".join(lines)


def _mean_std(values: list[float], digits: int, signed: bool = False) -> str:
    if not values:
        return "n/a"
    sign = "+" if signed else ""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{sign}.{digits}f}{spread}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", type=Path, help="pipeline outputs or alignment-bench units")
    parser.add_argument("--text", default="unseen", help='unseen, held-out, or a {"text"} JSONL path')
    args = parser.parse_args(argv)
    for group in args.groups:
        if not (group / "sft" / "model").is_dir():
            raise SystemExit(f"groups: {group} has no sft/model (not a finished pipeline or bench unit)")
    with tempfile.TemporaryDirectory() as scratch:
        table = {str(group): measure(group, args.text, Path(scratch)) for group in args.groups}
    print(f"text: {args.text}\n\n{report(table)}")


if __name__ == "__main__":
    sys.exit(main())
