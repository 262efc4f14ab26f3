"""``bench/alignment_tax.py``: the perplexity and the KL to the SFT policy of finished runs on pretraining
text, against a float64 computation from the two models' logits."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from bench_scripts import load_bench_script

from fastrlhf.models.tiny import resolve_model


def _finished_run(group, name, model_dir=None, lm=None):
    (group / name).mkdir(parents=True)
    if lm is None:
        os.symlink(model_dir, group / name / "model")
    else:
        lm.save_pretrained(group / name / "model")
    (group / name / "summary.json").write_text("{}")


@torch.no_grad()
def test_tax_of_an_unchanged_and_a_moved_policy_on_the_held_out_text(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastrlhf.data.bundled import data_path
    from fastrlhf.train.datasets import split_texts

    bench = load_bench_script("alignment_tax")
    tiny = resolve_model("tiny")
    group = tmp_path / "pipeline"
    (group / "sft").mkdir(parents=True)
    os.symlink(tiny, group / "sft" / "model")
    _finished_run(group, "ppo", model_dir=tiny)  # the SFT policy itself: no tax
    torch.manual_seed(2)
    moved = AutoModelForCausalLM.from_pretrained(tiny)
    for parameter in moved.parameters():
        parameter.add_(0.02 * torch.randn_like(parameter))
    _finished_run(group, "ppo-ptx", lm=moved)
    (group / "ppo-unfinished").mkdir()  # no summary.json: not measured

    figures = bench.measure(group, "held-out", tmp_path)
    assert set(figures) == {"sft", "ppo", "ppo-ptx"}
    assert figures["ppo"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert figures["ppo"]["perplexity"] == pytest.approx(figures["sft"]["perplexity"], rel=1e-6)

    # float64 from the HF models' logits, one unpadded line at a time
    text = str(data_path("sample", "ptx", "ptx_data"))
    _, sequences = split_texts(text, text, AutoTokenizer.from_pretrained(tiny))
    sft = AutoModelForCausalLM.from_pretrained(tiny).double()
    moved = moved.double()
    kl = nll = 0.0
    count = 0
    for sequence in sequences:
        ids = torch.tensor([sequence.input_ids])
        reference = sft(ids).logits[0, :-1].log_softmax(-1)
        policy = moved(ids).logits[0, :-1].log_softmax(-1)
        kl += float((reference.exp() * (reference - policy)).sum())
        nll -= float(policy.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert figures["ppo-ptx"]["kl"] == pytest.approx(kl / count, rel=1e-4)
    assert figures["ppo-ptx"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)

    table = bench.report({"g": figures})
    assert (
        "| g | " in table
        and f"ppo-ptx: perplexity rise {figures['ppo-ptx']['perplexity'] - figures['sft']['perplexity']:+.3f}"
        in table
    )


def test_unseen_facts_leave_out_the_groups_own_pretraining_text(tmp_path):
    bench = load_bench_script("alignment_tax")
    group = tmp_path / "unit"
    (group / "data").mkdir(parents=True)
    own = ["0 and 0 make 0.", "0 and 1 make 1."]
    (group / "data" / "ptx.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in own))
    with open(bench.unseen_facts(group, tmp_path), encoding="utf-8") as fh:
        unseen = [json.loads(line)["text"] for line in fh]
    assert unseen and not set(own) & set(unseen)
    from fastrlhf.data import synthetic

    assert len(unseen) == len(synthetic.facts()) - len(own)


def test_a_group_without_an_sft_policy_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no sft/model"):
        load_bench_script("alignment_tax").main([str(tmp_path)])
