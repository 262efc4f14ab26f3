"""A lean decode loop for rollouts: prefill, then one cached forward and one ``ops.sample`` per step.

HF ``generate`` spends a step on its logits processors, a ``[B, V]`` softmax and ``torch.multinomial``
(tens of milliseconds over a 32k vocabulary on a CPU), stopping criteria and bookkeeping; on a small
policy that is most of the step. Here a step is the model's forward on the last token with the KV cache,
then ``ops.sample`` (one fused pass per row that also returns the token's log-prob). Rows that emit EOS
leave the batch: their KV cache rows are dropped (``Cache.batch_select_indices``), so a finished row
stops costing compute. Under a multi-process group the rows stay and every process steps until all are
done, because sharded models (FSDP2, ZeRO-3) gather weights in collectives every forward.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.distributed as dist

from fastrlhf import ops
from fastrlhf.models.policy import logits_postprocessing
from fastrlhf.ops._matmul import FewRowWeight


@dataclasses.dataclass
class DecodedBatch:
    """``tokens`` int64 ``[B, steps]`` (``pad_token_id`` after a row's EOS), ``logprobs`` float32
    ``[B, steps]`` (each token's log-prob under the distribution it was drawn from; 0 after EOS)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _ForwardArguments:
    """How one decoding forward runs on this model: the keyword of its KV cache (transformers 5 renamed
    ``past_key_values`` to ``cache``), whether it can compute the last position's logits only, and, for
    a plain ``hidden @ lm_head.T`` model on the CPU, its trunk and head, run apart (see ``step``)."""

    cache: str
    last_logits_only: bool
    trunk: torch.nn.Module | None
    head: FewRowWeight | None

    @classmethod
    def of(cls, lm) -> _ForwardArguments:
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # peft passes kwargs through
        params = inspect.signature(base.forward).parameters
        cache = "cache" if "cache" in params else "past_key_values"
        trunk = head = None
        head_module = lm.get_output_embeddings()
        plain = type(head_module) is torch.nn.Linear and logits_postprocessing(lm.config) is None
        weight = getattr(head_module, "weight", None)
        # Only on plain tensors: a sharded model (FSDP2's DTensors, ZeRO-3's partitions) gathers its weights
        # in its modules' forward hooks, which running the trunk and reading the head directly would skip.
        local = type(weight) in (torch.Tensor, torch.nn.Parameter) and not hasattr(weight, "ds_id")
        if plain and local and weight.device.type == "cpu" and head_module.bias is None:
            # Packed once per decode: the weights do not change while it runs.
            trunk, head = lm.get_decoder(), FewRowWeight(weight)
            cache = "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"
        return cls(cache, "logits_to_keep" in params, trunk, head)

    def step(self, lm, cache, **inputs):
        """One forward; returns (the last position's logits ``[B, V]``, the cache)."""
        if cache is not None:
            inputs[self.cache] = cache
        if self.trunk is not None:
            out = self.trunk(use_cache=True, **inputs)
            hidden = out.last_hidden_state[:, -1, :]
            # The lm_head is most of a small policy's decoding step, and a few rows against a [V, H]
            # weight is a shape CPU BLAS serves badly; FewRowWeight streams the packed weight once.
            return self.head.logits(hidden), getattr(out, self.cache)
        if self.last_logits_only:
            inputs["logits_to_keep"] = 1  # the prefill's other positions would cost a [B*P, V] GEMM
        out = lm(use_cache=True, **inputs)
        return out.logits[:, -1, :], getattr(out, self.cache)


def _synchronised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_active_anywhere(active: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if active else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


@torch.no_grad()
def decode(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> DecodedBatch:
    """Sample up to ``max_new_tokens`` tokens after each left-padded prompt.

    Args:
        lm: a causal LM (``transformers`` model or peft wrapper) returning ``.logits`` and
            ``.past_key_values``; the caller sets eval mode.
        input_ids, attention_mask: ``[B, P]`` left-padded prompts.
        temperature, top_k, top_p, min_p: as ``ops.sample``; ``temperature == 0`` is greedy (argmax,
            log-prob 0).
        generator: the uniforms' generator (default torch's global one, which training checkpoints).
    """
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    synced = _synchronised()

    # Left padding: positions count real tokens only, as HF generate computes them.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    forward = _ForwardArguments.of(lm)
    logits, cache = forward.step(
        lm, None, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions
    )
    next_position = positions[:, -1:] + 1
    rows = torch.arange(batch, device=device)  # the original row of each batch row still decoding
    mask = attention_mask
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # multi-process only: rows past their EOS
    for step in range(max_new_tokens):
        if temperature > 0:
            drawn = ops.sample(logits, temperature, top_k, top_p, min_p, generator=generator)
            step_tokens, step_logprobs = drawn.tokens, drawn.logprobs
        else:
            step_tokens = logits.argmax(-1)
            step_logprobs = torch.zeros(step_tokens.shape, dtype=torch.float32, device=device)
        tokens[rows, step] = step_tokens
        logprobs[rows, step] = step_logprobs.float()
        finished = step_tokens == eos_token_id
        if step + 1 == max_new_tokens:
            break
        if synced:
            # Keep every row (finished ones keep decoding, their tokens overwritten below) so that every
            # process runs the same forwards.
            done |= finished
            if not _any_active_anywhere(not bool(done.all()), device):
                break
        elif bool(finished.any()):
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            rows, step_tokens, mask, next_position = (
                rows[keep],
                step_tokens[keep],
                mask[keep],
                next_position[keep],
            )
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits, cache = forward.step(
            lm, cache, input_ids=step_tokens[:, None], attention_mask=mask, position_ids=next_position
        )
        next_position = next_position + 1
    if synced:
        _blank_after_eos(tokens, logprobs, eos_token_id, pad_token_id)
    return DecodedBatch(tokens, logprobs)


def _blank_after_eos(tokens: torch.Tensor, logprobs: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """Positions after a row's first EOS become padding (log-prob 0), in place."""
    after = (tokens == eos_token_id).long().cumsum(-1) - (tokens == eos_token_id).long() > 0
    tokens.masked_fill_(after, pad_token_id)
    logprobs.masked_fill_(after, 0.0)
