"""The reward model: the SFT trunk with its unembedding removed and a scalar head on top.

The score of a (prompt, response) sequence is the head's output at its last non-pad token, plus a
normalisation bias. After training, the bias is set so that demonstrations score 0 on average, as
InstructGPT does; it is saved with the model and applied by every later use (``score``, PPO).

On disk a reward model is an ``AutoModelForSequenceClassification`` directory with one label; the
older fastrlhf format (trunk plus ``score_head.safetensors``) is still read. ``reward_model_format``
says how the score's constant is kept exact.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from fastrlhf.models.heads import ScalarHead, last_token_index
from fastrlhf.models.loading import ModelOptions, load_causal_lm
from fastrlhf.models.reward_model_format import (
    has_sequence_classifier,
    is_reward_model,
    read_score_head,
    write_legacy,
    write_sequence_classification,
)

__all__ = ["RewardModel", "is_reward_model"]

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    """``forward(input_ids[B, T], attention_mask[B, T]) -> scores[B]`` (float32), bias included."""

    def __init__(self, trunk: nn.Module, head: ScalarHead | None = None, normalization_bias: float = 0.0):
        super().__init__()
        self.trunk = trunk
        hidden_size = trunk.config.hidden_size
        self.head = head if head is not None else ScalarHead(hidden_size)
        self.register_buffer("normalization_bias", torch.tensor(float(normalization_bias)), persistent=True)

    @property
    def config(self):
        return self.trunk.config

    @property
    def _no_split_modules(self):
        """The trunk's layer classes: what FSDP's transformer wrap policy shards one unit each."""
        return getattr(self.trunk, "_no_split_modules", None)

    def hidden_states(self, **inputs) -> torch.Tensor:
        inputs.setdefault("use_cache", False)
        return self.trunk(**inputs).last_hidden_state

    def forward(self, last_index: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """Scores at each sequence's last real token; ``inputs`` as ``batching.model_inputs`` gives.

        Padded input (``input_ids[B, T]``, ``attention_mask[B, T]``, left or right padding): returns
        ``[B]``. Packed input (``input_ids[1, N]``, ``position_ids[1, N]``) needs ``last_index[n]``, the
        flat positions of each sequence's last token; returns ``[n]``.
        """
        hidden = self.hidden_states(**inputs)
        if last_index is None:
            attention_mask = inputs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(inputs["input_ids"])
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last_hidden = hidden[rows, last_token_index(attention_mask)]
        else:
            last_hidden = hidden.reshape(-1, hidden.shape[-1])[last_index]
        return self.head(last_hidden) + self.normalization_bias

    def set_normalization_bias(self, value: float) -> None:
        self.normalization_bias.fill_(float(value))

    # ---- HF-directory save / load -------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Write an ``AutoModelForSequenceClassification`` directory (LoRA merged in), with ``tokenizer``
        when given; ``self`` is left unchanged."""
        trunk = self.trunk
        if hasattr(trunk, "merge_and_unload"):
            # A merged copy: the saved directory is a plain HF model, and self keeps its adapters.
            import copy

            trunk = copy.deepcopy(trunk).merge_and_unload()
        normalization_bias = float(self.normalization_bias)
        write = write_sequence_classification
        if not has_sequence_classifier(trunk.config):
            log.warning(
                "%s has no AutoModelForSequenceClassification; the reward model is saved in fastrlhf's own "
                "format (trunk + score_head.safetensors), which only fastrlhf reads",
                type(trunk).__name__,
            )
            write = write_legacy
        write(
            directory,
            trunk,
            self.head.proj.weight,
            offset=float(self.head.proj.bias.detach().double()) + normalization_bias,
            normalization_bias=normalization_bias,
            tokenizer=tokenizer,
        )

    @classmethod
    def from_pretrained(
        cls, model: str, options: ModelOptions | None = None, device_index: int = 0, trains: bool = False
    ) -> RewardModel:
        """Load a reward model (either format, transformers' sequence classifiers with one label included),
        or start one from a causal LM (then the head is freshly initialised). ``trains``: it is trained
        (a reward model being fit, a critic), which decides ``dtype="auto"`` (``load_causal_lm``)."""
        from transformers import AutoModel

        from fastrlhf.models.tiny import resolve_model

        path = resolve_model(model)
        trunk = load_causal_lm(path, options, auto_class=AutoModel, device_index=device_index, trains=trains)
        reward_model = cls(trunk)
        saved = read_score_head(path, reward_model.head.proj.in_features)
        if saved is not None:
            # One constant: the head's bias is 0 and the normalisation bias carries the whole offset.
            with torch.no_grad():
                reward_model.head.proj.weight.copy_(saved.weight)
                reward_model.head.proj.bias.zero_()
                reward_model.normalization_bias.fill_(saved.offset)
        return reward_model
