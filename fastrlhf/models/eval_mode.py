"""One home for "run this block in eval mode and give the module its mode back"."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """Eval mode (no dropout) and no grad for the block; the module's previous mode comes back after it,
    even when the block raises."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)
