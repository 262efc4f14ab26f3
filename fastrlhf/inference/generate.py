"""Sampling responses to prompts (KV cache, left padding), cut at the first EOS; optionally with each
sampled token's log-probability under the distribution it was drawn from. Two samplers: fastrlhf's own
decode loop (``inference.decode``, ``ops.sample`` at each step; the default) and HF ``generate``."""

from __future__ import annotations

import dataclasses

import torch
from transformers import LogitsProcessorList

from fastrlhf.data.batching import pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.errors import InputError
from fastrlhf.inference.decode import decode
from fastrlhf.models.eval_mode import evaluating

SAMPLERS = ("fastrlhf", "hf")


@dataclasses.dataclass(frozen=True)
class GeneratedResponse:
    """One sampled response: its tokens up to and including the first EOS, and whether it had one;
    with ``return_logprobs``, each token's log-probability as generation sampled it (else None)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    ended_with_eos: bool
    logprobs: tuple[float, ...] | None = None


class SampledTokenLogprobs:
    """A ``generate`` logits processor that records each sampled token's log-probability under
    ``softmax(logits / temperature)``, the distribution sampled when no other warper is on (top-k 0,
    top-p 1). It returns the scores unchanged.

    transformers runs custom processors before its temperature warper, so a call sees the step's raw
    logits ``[B, V]``; the token drawn from them is known only at the next call (the last column of its
    ``input_ids``), so one step's logits are held until then, and ``finish`` takes the last step's.
    The log-probability comes from ``ops.gather_logprobs``: one pass over the row, no softmax tensor."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # per step, [B] float32

    def _take(self, tokens: torch.Tensor) -> None:
        from fastrlhf import ops

        self.steps.append(ops.gather_logprobs(self.pending.float(), tokens, temperature=self.temperature))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = scores.detach().clone()
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, steps]`` log-probabilities, given ``generate``'s output ``sequences``."""
        if self.pending is not None:
            self._take(sequences[:, -1])
            self.pending = None
        return torch.stack(self.steps, dim=1)


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
    return_logprobs: bool = False,
    sampler: str = "fastrlhf",
) -> list[GeneratedResponse]:
    """Sample a response to each prompt (token ids), in batches of ``batch_size``.

    ``temperature == 0`` decodes greedily. ``generator_seed`` reseeds torch's global RNG (HF ``generate``
    takes no generator); leave it None inside a training loop, whose RNG is seeded once and checkpointed.
    The model runs in eval mode (no dropout) and is restored to its previous mode afterwards.
    Responses are truncated after the first EOS; a response that never emitted
    EOS within ``max_new_tokens`` is returned whole with ``ended_with_eos=False`` (PPO may penalise it).
    ``return_logprobs``: each response token's log-probability under the distribution it was drawn from
    (the tempered softmax, truncated by top-p; 0 when greedy), from the cached decoding's own logits.
    ``sampler``: "fastrlhf" (the lean loop) or "hf" (``generate``; its log-probs need temperature > 0 and
    top-p 1).
    """
    if sampler not in SAMPLERS:
        raise InputError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if sampler == "hf" and return_logprobs and (temperature == 0 or top_p < 1):
        raise InputError(
            "return_logprobs: needs sampling from the whole tempered softmax (temperature > 0, top_p 1), "
            f"got temperature {temperature}, top_p {top_p}"
        )
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(lm.parameters()).device
    results = []
    with evaluating(lm):
        for start in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[start : start + batch_size]
            sequences = [TokenizedSequence(tuple(p), len(p), False, False, "") for p in chunk]
            batch = pad_batch(sequences, pad_token_id, padding_side="left")
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            new_tokens, step_logprobs = _DECODERS[sampler](
                lm,
                input_ids,
                attention_mask,
                max_new_tokens,
                pad_token_id,
                eos_token_id,
                temperature,
                top_p,
                return_logprobs,
            )
            for row, (prompt, tokens) in enumerate(zip(chunk, new_tokens, strict=True)):
                ended = eos_token_id in tokens
                cut = tokens[: tokens.index(eos_token_id) + 1] if ended else tokens
                logprobs = tuple(step_logprobs[row][: len(cut)]) if step_logprobs is not None else None
                results.append(GeneratedResponse(tuple(prompt), tuple(cut), ended, logprobs))
    return results


def _lean_decode(
    lm,
    input_ids,
    attention_mask,
    max_new_tokens,
    pad_token_id,
    eos_token_id,
    temperature,
    top_p,
    return_logprobs,
):
    """The lean loop's new tokens ``[B][steps]`` and, with ``return_logprobs``, their log-probs."""
    decoded = decode(
        lm,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        temperature=temperature,
        top_p=top_p,
    )
    return decoded.tokens.tolist(), decoded.logprobs.tolist() if return_logprobs else None


def _hf_generate(
    lm,
    input_ids,
    attention_mask,
    max_new_tokens,
    pad_token_id,
    eos_token_id,
    temperature,
    top_p,
    return_logprobs,
):
    """HF ``generate``'s new tokens ``[B][steps]`` and, with ``return_logprobs``, their log-probs."""
    # top_k=0 turns off transformers' default top-k of 50: PPO's log-probs and KL estimates assume the
    # samples come from the policy's own (tempered) distribution, not a truncated one.
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False}
    )
    recorder = SampledTokenLogprobs(temperature) if return_logprobs else None
    output = lm.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
        logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
        **sampling,
    )
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return new_tokens, recorder.finish(output).tolist() if recorder is not None else None


# One entry per name in SAMPLERS; each takes the same arguments and returns (new tokens, log-probs | None).
_DECODERS = {"fastrlhf": _lean_decode, "hf": _hf_generate}
