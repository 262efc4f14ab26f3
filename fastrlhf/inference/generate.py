"""Sampling responses to prompts with HF ``generate`` (KV cache, left padding), cut at the first EOS."""

from __future__ import annotations

import dataclasses

import torch

from fastrlhf.data.batching import pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.errors import InputError


@dataclasses.dataclass(frozen=True)
class GeneratedResponse:
    """One sampled response: its tokens up to and including the first EOS, and whether it had one."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    ended_with_eos: bool


@torch.no_grad()
def generate_responses(
    lm,
    prompt_ids: list[tuple[int, ...]],
    *,
    pad_token_id: int,
    eos_token_id: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    generator_seed: int | None = None,
) -> list[GeneratedResponse]:
    """Sample a response to each prompt (token ids), in batches of ``batch_size``.

    ``temperature == 0`` decodes greedily. ``generator_seed`` reseeds torch's global RNG (HF ``generate``
    takes no generator); leave it None inside a training loop, whose RNG is seeded once and checkpointed.
    The model runs in eval mode (no dropout) and is restored to its previous mode afterwards.
    Responses are truncated after the first EOS; a response that never emitted
    EOS within ``max_new_tokens`` is returned whole with ``ended_with_eos=False`` (PPO may penalise it).
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    results = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            sequences = [TokenizedSequence(tuple(p), len(p), False, False, "") for p in chunk]
            batch = pad_batch(sequences, pad_token_id, padding_side="left")
            # top_k=0 turns off transformers' default top-k of 50: PPO's log-probs and KL estimates assume
            # the samples come from the policy's own (tempered) distribution, not a truncated one.
            sampling = (
                {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
                if temperature > 0
                else {"do_sample": False}
            )
            output = lm.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
                use_cache=True,
                **sampling,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            for prompt, tokens in zip(chunk, new_tokens, strict=True):
                ended = eos_token_id in tokens
                cut = tokens[: tokens.index(eos_token_id) + 1] if ended else tokens
                results.append(GeneratedResponse(tuple(prompt), tuple(cut), ended))
    finally:
        lm.train(was_training)
    return results
