"""The reward model: the SFT trunk with its unembedding removed and a scalar head on top.

The score of a (prompt, response) sequence is the head's output at its last non-pad token, plus a
normalisation bias. After training, the bias is set so that demonstrations score 0 on average, as
InstructGPT does; it is stored with the checkpoint and applied by every later use (``score``, PPO).

On disk a reward model is a normal HF directory for the trunk (``AutoModel`` loads it) plus
``score_head.safetensors`` (the head's weight and bias, and the normalisation bias) and
``reward_model.json`` (format marker and the bias, human-readable).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastrlhf.errors import InputError
from fastrlhf.models.heads import ScalarHead, last_token_index
from fastrlhf.models.loading import ModelOptions, load_causal_lm

HEAD_FILE = "score_head.safetensors"
META_FILE = "reward_model.json"
FORMAT = "fastrlhf-reward-model"


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

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the trunk (LoRA merged in), the head and the bias into ``directory``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        trunk = self.trunk
        if hasattr(trunk, "merge_and_unload"):
            # A merged copy: the saved directory is a plain HF model, and self keeps its adapters.
            import copy

            trunk = copy.deepcopy(trunk).merge_and_unload()
        trunk.save_pretrained(directory)
        tensors = {
            "weight": self.head.proj.weight.detach().float().cpu().contiguous(),
            "bias": self.head.proj.bias.detach().float().cpu().contiguous(),
            "normalization_bias": self.normalization_bias.detach().float().cpu().reshape(1),
        }
        save_file(tensors, os.path.join(directory, HEAD_FILE), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "version": 1,
            "hidden_size": self.head.proj.in_features,
            "normalization_bias": float(self.normalization_bias),
        }
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def from_pretrained(
        cls, model: str, options: ModelOptions | None = None, device_index: int = 0
    ) -> RewardModel:
        """Load a saved reward model, or start one from a causal LM (then the head is freshly initialised)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        from fastrlhf.models.tiny import resolve_model

        path = resolve_model(model)
        trunk = load_causal_lm(path, options, auto_class=AutoModel, device_index=device_index)
        reward_model = cls(trunk)
        head_path = os.path.join(path, HEAD_FILE)
        if os.path.exists(head_path):
            tensors = load_file(head_path)
            expected = reward_model.head.proj.weight.shape
            if tensors["weight"].shape != expected:
                raise InputError(
                    f"{head_path}: head weight has shape {tuple(tensors['weight'].shape)}, "
                    f"the trunk needs {tuple(expected)}"
                )
            with torch.no_grad():
                reward_model.head.proj.weight.copy_(tensors["weight"])
                reward_model.head.proj.bias.copy_(tensors["bias"])
                reward_model.normalization_bias.copy_(tensors["normalization_bias"].reshape(()))
        return reward_model


def is_reward_model(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a saved reward model (a head next to the trunk)."""
    return os.path.exists(os.path.join(path, HEAD_FILE))
