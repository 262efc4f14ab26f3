"""Scoring (prompt, response) pairs with a trained reward model, its normalisation bias applied."""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device

from fastrlhf.data.batching import make_collator, model_inputs
from fastrlhf.data.records import SFTExample
from fastrlhf.data.tokenize import TruncationPolicy, tokenize_sft
from fastrlhf.models.eval_mode import evaluating


@torch.no_grad()
def score_pairs(
    reward_model, tokenizer, records: list[SFTExample], truncation: TruncationPolicy, batch_size: int = 16
) -> list[float]:
    """The reward of each record's response to its prompt (the same tokenisation as RM training)."""
    sequences, _ = tokenize_sft(records, tokenizer, truncation)
    collate = make_collator(tokenizer.pad_token_id, packing=False)
    device = next(reward_model.parameters()).device
    scores = []
    with evaluating(reward_model):
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size])
            out = reward_model(**send_to_device(model_inputs(batch), device))
            scores.extend(out.float().cpu().tolist())
    return scores
