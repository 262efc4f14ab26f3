"""``text_kl_to_reference``: the held-out text's per-token KL(reference || policy) over the whole vocabulary,
against a float64 computation written out from the two language models' logits, in every memory mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.models.actor_critic import build_actor_critic
from fastrlhf.models.loading import ModelOptions
from fastrlhf.train import evaluation
from fastrlhf.train.evaluation import text_kl_to_reference

OPTIONS = {"separate": {}, "shared": {}, "lora": {"lora_r": 8}}
PAD = 0


def _texts(lengths) -> list[TokenizedSequence]:
    return [TokenizedSequence(tuple(torch.randint(6, 1000, (n,)).tolist()), 0) for n in lengths]


@torch.no_grad()
def _float64_kl(policy_logits, reference_logits, texts) -> float:
    """Mean over every next-token position of Σ_v p_ref(v) (log p_ref(v) - log p_policy(v)), in float64."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([text.input_ids])
        policy = policy_logits(ids)[0, :-1].double().log_softmax(-1)
        reference = reference_logits(ids)[0, :-1].double().log_softmax(-1)
        total += float((reference.exp() * (reference - policy)).sum())
        count += ids.shape[1] - 1
    return total / count


def _moved(model, mode: str) -> None:
    """Perturb what the policy trains (its weights, or its LoRA adapter), never the reference."""
    with torch.no_grad():
        for name, parameter in model.policy_lm.named_parameters():
            if mode != "lora" or "lora_B" in name:
                parameter.add_(0.02 * torch.randn_like(parameter))


@pytest.mark.parametrize("mode", ["separate", "shared", "lora"])
def test_text_kl_matches_float64_and_is_zero_before_training(mode, monkeypatch):
    torch.manual_seed(11)
    model = build_actor_critic(mode, "tiny", None, ModelOptions(**OPTIONS[mode])).eval()
    texts = _texts([9, 1, 17, 4, 2, 30, 5])  # a 1-token line has nothing to predict

    untouched = text_kl_to_reference(model, texts, PAD, batch_size=3, device="cpu")
    assert untouched == pytest.approx(0.0, abs=1e-7)

    _moved(model, mode)
    if mode == "lora":
        lm = copy.deepcopy(model.policy_lm).double()

        def policy_logits(ids):
            return lm(ids).logits

        def reference_logits(ids):
            with lm.disable_adapter():
                return lm(ids).logits
    else:
        policy_lm = copy.deepcopy(model.policy_lm).double()
        reference_lm = copy.deepcopy(model.reference_lm).double()

        def policy_logits(ids):
            return policy_lm(ids).logits

        def reference_logits(ids):
            return reference_lm(ids).logits

    expected = _float64_kl(policy_logits, reference_logits, texts)
    assert expected > 1e-4  # the perturbation moved the policy measurably
    for batch_size in (1, 3, 8):  # padding must not leak into the mean
        measured = text_kl_to_reference(model, texts, PAD, batch_size=batch_size, device="cpu")
        assert measured == pytest.approx(expected, rel=1e-4), batch_size
    monkeypatch.setattr(evaluation, "KL_ROWS_PER_BLOCK", 5)  # blocks that split rows of one line
    blocked = text_kl_to_reference(model, texts, PAD, batch_size=3, device="cpu")
    assert blocked == pytest.approx(expected, rel=1e-4)


def test_text_kl_of_no_text_is_nan():
    model = build_actor_critic("separate", "tiny", None, ModelOptions()).eval()
    assert math.isnan(text_kl_to_reference(model, _texts([1, 1]), PAD, batch_size=2, device="cpu"))
