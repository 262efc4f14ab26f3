"""fastrlhf.data: the seed's JSONL formats, tokenisation with prompt/response boundaries, batching.

The batching helpers need torch, which the data commands (``fastrlhf data``, reading and checking JSONL)
never do: they are loaded on first use, so ``import fastrlhf.data`` stays free of torch.
"""

import importlib

from fastrlhf.data.readers import DataError, read_jsonl
from fastrlhf.data.records import ChatExample, PromptExample, RankedExample, SFTExample, TextExample
from fastrlhf.data.tokenize import (
    TokenizationReport,
    TokenizedGroup,
    TokenizedSequence,
    TruncationPolicy,
    tokenize_prompt,
    tokenize_prompt_response,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
    tokenize_texts,
)

# Loaded from fastrlhf.data.batching on first use (``__getattr__``).
_BATCHING = (
    "IGNORE_INDEX",
    "Collator",
    "LengthGroupedBatchSampler",
    "choose_packing",
    "make_collator",
    "model_inputs",
    "pack_batch",
    "pad_batch",
    "padding_fraction",
)

__all__ = [
    "ChatExample",
    "DataError",
    "PromptExample",
    "RankedExample",
    "SFTExample",
    "TextExample",
    "TokenizationReport",
    "TokenizedGroup",
    "TokenizedSequence",
    "TruncationPolicy",
    "read_jsonl",
    "tokenize_prompt",
    "tokenize_prompt_response",
    "tokenize_prompts",
    "tokenize_ranked",
    "tokenize_sft",
    "tokenize_texts",
    *_BATCHING,
]


def __getattr__(name: str):
    if name in _BATCHING:
        return getattr(importlib.import_module("fastrlhf.data.batching"), name)
    raise AttributeError(f"module 'fastrlhf.data' has no attribute {name!r}")
