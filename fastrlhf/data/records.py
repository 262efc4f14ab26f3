"""The examples the readers produce, one dataclass per kind of line.

Every record keeps where it came from (``source``: "file:line") so that later errors, e.g. an empty
response after truncation, can still point at the line.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """``{"prompt", "response"}``: a demonstration. The loss falls on the response only."""

    prompt: str
    response: str
    user: str | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class RankedExample:
    """``{"prompt", "responses": [{"text", "ranking"}]}``: K responses, ranking 1 best; equal rankings are
    ties (their pair is dropped by the ranking loss). A chosen/rejected pair is the K=2 case."""

    prompt: str
    texts: tuple[str, ...]
    rankings: tuple[int, ...]
    user: str | None = None
    source: str = ""

    @property
    def best(self) -> str:
        """The rank-1 response (the first of them when tied)."""
        return self.texts[min(range(len(self.rankings)), key=self.rankings.__getitem__)]


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """``{"prompt"}``: a PPO prompt; extra fields are ignored."""

    prompt: str
    user: str | None = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class TextExample:
    """``{"text"}``: pretraining text for PPO-ptx."""

    text: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """``{"messages": [{"role", "content"}, ...]}``: a conversation; the last message is the assistant's
    response and the ones before it are the prompt."""

    messages: tuple[tuple[str, str], ...]
    user: str | None = None
    source: str = ""
