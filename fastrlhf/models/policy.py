"""A causal LM seen as a policy: per-token log-probs of chosen targets, straight from the hidden states.

The unembedding runs only on the positions that have a target (response tokens), through
``fastrlhf.ops.linear_logprobs``: no ``[tokens, vocab]`` logits are ever held, and prompt and pad
positions cost nothing past the trunk.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrlhf import ops
from fastrlhf.data.batching import IGNORE_INDEX
from fastrlhf.errors import InputError


def logits_postprocessing(config) -> str | None:
    """What a model does to its logits after the lm_head (soft-capping, scaling), or None when nothing."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return f"soft-caps its logits (final_logit_softcapping={cap})"
    for name in ("logit_scale", "logits_scaling"):  # Cohere multiplies by one, Granite divides by the other
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"scales its logits ({name}={value})"
    return None


def require_plain_logits(config, model: str) -> None:
    """Refuse a model whose logits are not ``hidden @ lm_head.T``: its log-probs would be silently wrong.

    Called before a trainer loads the weights, so the refusal comes first."""
    reason = logits_postprocessing(config)
    if reason is not None:
        raise InputError(
            f"model {model!r} ({config.model_type}) {reason} after the lm_head; fastrlhf trains on "
            "log_softmax(hidden @ lm_head.T), which would differ from the model's own log-probs. Such a "
            "model can generate and be scored, not trained with sft or ppo"
        )


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(trunk, lm_head)`` of an HF causal LM, peft-wrapped or not.

    The trunk returns the final (normed) hidden states that the lm_head reads.
    """
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    if decoder is None or not isinstance(head, nn.Linear):
        raise InputError(f"{type(lm).__name__}: cannot find the decoder and a Linear lm_head")
    require_plain_logits(lm.config, type(lm).__name__)
    return decoder, head


def target_logprobs(targets: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False):
    """``head_fn(hidden[B, T, H], lm_head) -> logprobs[n]``: the log-probs (float32) of ``targets[B, T]``
    at the ``n`` positions where they are not -100, row-major, through ``ops.linear_logprobs``; for
    ``ActorCritic.forward(head_fn=...)``, which applies it inside the model's forward."""
    selected = targets != IGNORE_INDEX

    def head_fn(hidden: torch.Tensor, head: nn.Linear):
        return ops.linear_logprobs(
            hidden[selected],
            head.weight,
            targets[selected],
            bias=head.bias,
            temperature=temperature,
            return_entropy=return_entropy,
        )

    return head_fn


class CausalLMPolicy(nn.Module):
    """Wraps an HF causal LM so that ``forward`` returns target log-probs (and a DDP wrapper sees it all).

    ``forward(targets[B, T], **model_inputs(batch))`` returns ``logprobs[n]`` (float32) for the ``n``
    positions where ``targets != -100``, in row-major order, and optionally their entropies. The
    inputs are a padded ``[B, T]`` or a packed ``[1, N]`` batch (``fastrlhf.data.batching``).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def config(self):
        return self.lm.config

    @property
    def _no_split_modules(self):
        """The LM's layer classes: what FSDP's transformer wrap policy shards one unit each."""
        return getattr(self.lm, "_no_split_modules", None)

    def hidden_states(self, **inputs) -> torch.Tensor:
        """``[B, T, H]`` final hidden states; ``inputs`` as ``fastrlhf.data.batching.model_inputs`` gives."""
        decoder, _ = decoder_and_head(self.lm)
        inputs.setdefault("use_cache", False)
        return decoder(**inputs).last_hidden_state

    def forward(
        self, targets: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False, **inputs
    ):
        hidden = self.hidden_states(**inputs)
        _, head = decoder_and_head(self.lm)
        return target_logprobs(targets, temperature, return_entropy)(hidden, head)
