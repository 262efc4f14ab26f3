"""A scalar head on a transformer trunk: the reward model's score and the critic's value."""

from __future__ import annotations

import math

import torch
from torch import nn


class ScalarHead(nn.Module):
    """``Linear(hidden_size, 1)``: ``[..., H] -> [...]``.

    The weight starts N(0, 1/sqrt(H + 1)) and the bias at 0, the initialisation InstructGPT's reward model
    uses: an untrained head gives scores of order 1 whatever the hidden size.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.proj = nn.Linear(hidden_size, 1, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.proj.in_features + 1)
        nn.init.normal_(self.proj.weight, mean=0.0, std=std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden[..., H]`` -> ``[...]`` in float32 (the head runs in fp32 for a stable score)."""
        return nn.functional.linear(hidden.float(), self.proj.weight.float(), self.proj.bias.float()).squeeze(
            -1
        )


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``attention_mask[B, T]`` -> ``[B]``: the position of each row's last real (non-pad) token.

    Works for left and right padding alike: it is the largest position whose mask is set.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=1)
