"""fastrlhf.data: readers for the seed's JSONL formats (tokenisation, batching and hygiene build on them)."""

from fastrlhf.data.readers import DataError, read_jsonl
from fastrlhf.data.records import ChatExample, PromptExample, RankedExample, SFTExample, TextExample

__all__ = [
    "ChatExample",
    "DataError",
    "PromptExample",
    "RankedExample",
    "SFTExample",
    "TextExample",
    "read_jsonl",
]
