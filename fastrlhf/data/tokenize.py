"""Tokenisation that keeps the exact prompt/response boundary.

A sequence is ``prompt ids + response ids``, each tokenised on its own and then concatenated, so the
boundary (``prompt_length``) is exact: the loss falls on positions ``>= prompt_length`` and nothing of
the prompt leaks into it. Formatting:

- **With a chat template** (``tokenizer.chat_template``): the prompt is the template applied to the
  user turn (or, for a ``ChatExample``, to every message but the last) with the generation prompt added.
- **Without one**: ``bos`` (when the tokenizer adds one) followed by the prompt text; chat messages are
  rendered as ``"role: content"`` lines ending in an ``"assistant:"`` cue.
- **Response**: its own tokens (no special tokens) followed by ``eos``.

Truncation happens after formatting (so templates never lose their closing tags to it):

- A long **prompt keeps its end** (the instruction next to the response matters most); a leading ``bos``
  survives, since models are trained never to see a sequence without it.
- A long **response keeps its beginning** and then has **no eos**: it did not end, and teaching the model
  to stop there would teach it to stop mid-sentence. An untruncated response always ends in ``eos``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fastrlhf.data.readers import DataError
from fastrlhf.data.records import ChatExample, PromptExample, RankedExample, SFTExample, TextExample
from fastrlhf.errors import InputError

Messages = Sequence[tuple[str, str]]
Prompt = str | Messages  # a plain prompt, or the (role, content) messages before the response


@dataclasses.dataclass(frozen=True)
class TruncationPolicy:
    """Token budgets, applied after formatting. Prompts keep their end, responses their beginning."""

    max_prompt_tokens: int = 256
    max_response_tokens: int = 256

    def __post_init__(self):
        for field in ("max_prompt_tokens", "max_response_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InputError(f"{field} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
    """One prompt + response: ``input_ids[:prompt_length]`` is the prompt, the rest the response.

    ``input_ids``: ``[L]`` token ids. The loss falls only on positions ``>= prompt_length``; a prompt-only
    sequence (for generation) has ``prompt_length == len(input_ids)``, pretraining text has 0.
    """

    input_ids: tuple[int, ...]
    prompt_length: int
    truncated_prompt: bool = False
    truncated_response: bool = False
    source: str = ""

    def __post_init__(self):
        if not 0 <= self.prompt_length <= len(self.input_ids):
            raise InputError(
                f"prompt_length={self.prompt_length} is outside [0, {len(self.input_ids)}] ({self.source})"
            )

    @property
    def response_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.prompt_length :]


@dataclasses.dataclass(frozen=True)
class TokenizedGroup:
    """The K responses to one prompt (each a full sequence sharing the same prompt ids) and their
    rankings (1 = best), as the ranking loss reads them."""

    sequences: tuple[TokenizedSequence, ...]
    rankings: tuple[int, ...]
    source: str = ""


@dataclasses.dataclass
class TokenizationReport:
    """Counts over the sequences produced (a ranked example of K responses gives K sequences)."""

    examples: int = 0
    sequences: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    max_length: int = 0

    def add(self, sequence: TokenizedSequence) -> None:
        self.sequences += 1
        self.truncated_prompts += sequence.truncated_prompt
        self.truncated_responses += sequence.truncated_response
        self.prompt_tokens += sequence.prompt_length
        self.response_tokens += len(sequence.input_ids) - sequence.prompt_length
        self.max_length = max(self.max_length, len(sequence.input_ids))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"tokenized {self.examples} examples into {self.sequences} sequences: "
            f"{self.prompt_tokens + self.response_tokens} tokens ({self.prompt_tokens} prompt, "
            f"{self.response_tokens} response), longest {self.max_length}; truncated "
            f"{self.truncated_prompts} prompts, {self.truncated_responses} responses"
        )


def _error(source: str, problem: str) -> DataError:
    path, sep, line = source.rpartition(":")
    if sep and line.isdigit():
        return DataError(path, int(line), problem)
    return DataError(source or "<no source>", None, problem)


def _ids(encoded) -> list:
    # apply_chat_template(tokenize=True) gives a BatchEncoding in transformers 5.x (return_dict defaults
    # to True there) and a bare list in 4.x or in tokenizers that override it.
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def _plain_chat(messages: Messages) -> str:
    return "\n".join(f"{role}: {content}" for role, content in messages) + "\nassistant:"


class _Encoder:
    """Formats and tokenises many prompts / responses per call (fast tokenizers batch in Rust)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no eos token: a response could not mark its end")
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.chat = getattr(tokenizer, "chat_template", None) is not None
        # "adds a bos" is what the tokenizer's own special-token handling does on an empty text.
        self.add_bos = self.bos is not None and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            self.bos
        ]

    def prompts(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        if not prompts:
            return []
        if self.chat:
            conversations = [
                [{"role": "user", "content": p}]
                if isinstance(p, str)
                else [{"role": role, "content": content} for role, content in p]
                for p in prompts
            ]
            encoded = self.tokenizer.apply_chat_template(
                conversations, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return [list(ids) for ids in _ids(encoded)]
        texts = [p if isinstance(p, str) else _plain_chat(p) for p in prompts]
        prefix = [self.bos] if self.add_bos else []
        return [prefix + ids for ids in self.texts(texts)]

    def texts(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def truncate_prompt(self, ids: list[int], limit: int) -> tuple[list[int], bool]:
        if len(ids) <= limit:
            return ids, False
        if limit > 1 and self.bos is not None and ids[0] == self.bos:
            return [self.bos] + ids[len(ids) - limit + 1 :], True
        return ids[len(ids) - limit :], True

    def finish_response(self, ids: list[int], limit: int, source: str) -> tuple[list[int], bool]:
        """``ids + [eos]`` when that fits in ``limit``, else the first ``limit`` ids and no eos."""
        if not ids:
            raise _error(source, "the response is empty after tokenisation")
        if len(ids) < limit:
            return ids + [self.eos], False
        return ids[:limit], True


def _assemble(
    encoder: _Encoder, prompt_ids: list[int], response_ids: list[int], policy: TruncationPolicy, source: str
) -> TokenizedSequence:
    prompt_ids, cut_prompt = encoder.truncate_prompt(prompt_ids, policy.max_prompt_tokens)
    response_ids, cut_response = encoder.finish_response(response_ids, policy.max_response_tokens, source)
    return TokenizedSequence(
        tuple(prompt_ids + response_ids), len(prompt_ids), cut_prompt, cut_response, source
    )


def tokenize_prompt_response(
    tokenizer, prompt: Prompt, response: str, policy: TruncationPolicy, source: str = ""
) -> TokenizedSequence:
    """One formatted prompt + response; ``prompt`` is a string or the (role, content) messages before it.
    Raises ``DataError`` naming ``source`` when the response has no tokens."""
    encoder = _Encoder(tokenizer)
    (prompt_ids,) = encoder.prompts([prompt])
    (response_ids,) = encoder.texts([response])
    return _assemble(encoder, prompt_ids, response_ids, policy, source)


def tokenize_prompt(tokenizer, prompt: Prompt, policy: TruncationPolicy) -> tuple[int, ...]:
    """The formatted, left-truncated prompt ids ``[P]`` that generation continues from."""
    encoder = _Encoder(tokenizer)
    (ids,) = encoder.prompts([prompt])
    return tuple(encoder.truncate_prompt(ids, policy.max_prompt_tokens)[0])


def tokenize_prompts(
    records: Sequence[PromptExample], tokenizer, policy: TruncationPolicy
) -> tuple[list[TokenizedSequence], TokenizationReport]:
    """PPO prompts as prompt-only sequences (``prompt_length == len(input_ids)``), ready for left padding."""
    encoder = _Encoder(tokenizer)
    report = TokenizationReport(examples=len(records))
    sequences = []
    for record, ids in zip(records, encoder.prompts([r.prompt for r in records]), strict=True):
        ids, cut = encoder.truncate_prompt(ids, policy.max_prompt_tokens)
        sequences.append(TokenizedSequence(tuple(ids), len(ids), cut, False, record.source))
        report.add(sequences[-1])
    return sequences, report


def _split(record: SFTExample | ChatExample) -> tuple[Prompt, str]:
    if isinstance(record, SFTExample):
        return record.prompt, record.response
    if isinstance(record, ChatExample):
        role, content = record.messages[-1]
        if role != "assistant" or len(record.messages) < 2:
            raise _error(record.source, "a chat example must end with the assistant's message after a prompt")
        return record.messages[:-1], content
    raise TypeError(f"expected SFTExample or ChatExample, got {type(record).__name__}")


def tokenize_sft(
    records: Sequence[SFTExample | ChatExample], tokenizer, policy: TruncationPolicy
) -> tuple[list[TokenizedSequence], TokenizationReport]:
    """Demonstrations as sequences whose response is the demonstration; one sequence per record."""
    encoder = _Encoder(tokenizer)
    prompts, responses = zip(*map(_split, records), strict=True) if records else ((), ())
    report = TokenizationReport(examples=len(records))
    sequences = []
    for record, prompt_ids, response_ids in zip(
        records, encoder.prompts(prompts), encoder.texts(responses), strict=True
    ):
        sequences.append(_assemble(encoder, prompt_ids, response_ids, policy, record.source))
        report.add(sequences[-1])
    return sequences, report


def tokenize_ranked(
    records: Sequence[RankedExample], tokenizer, policy: TruncationPolicy
) -> tuple[list[TokenizedGroup], TokenizationReport]:
    """One group per prompt: its K responses as K sequences that share the prompt's ids."""
    encoder = _Encoder(tokenizer)
    prompt_ids = encoder.prompts([r.prompt for r in records])
    # every response of every record in one tokenizer call; ``start`` walks the flat list record by record
    response_ids = encoder.texts([text for r in records for text in r.texts])
    report = TokenizationReport(examples=len(records))
    groups, start = [], 0
    for record, ids in zip(records, prompt_ids, strict=True):
        responses = response_ids[start : start + len(record.texts)]
        start += len(record.texts)
        sequences = tuple(_assemble(encoder, ids, r, policy, record.source) for r in responses)
        for sequence in sequences:
            report.add(sequence)
        groups.append(TokenizedGroup(sequences, tuple(record.rankings), record.source))
    return groups, report


def tokenize_texts(
    records: Sequence[TextExample], tokenizer, max_tokens: int
) -> tuple[list[TokenizedSequence], TokenizationReport]:
    """Pretraining text (PPO-ptx) as ``bos? + text + eos`` with ``prompt_length=0``: every token after the
    first is predicted. A text longer than ``max_tokens`` keeps its beginning, has no eos and counts as a
    truncated response."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    encoder = _Encoder(tokenizer)
    prefix = [encoder.bos] if encoder.add_bos else []
    report = TokenizationReport(examples=len(records))
    sequences = []
    for record, ids in zip(records, encoder.texts([r.text for r in records]), strict=True):
        if not ids:
            raise _error(record.source, "the text is empty after tokenisation")
        ids, cut = encoder.finish_response(prefix + ids, max_tokens, record.source)
        sequences.append(TokenizedSequence(tuple(ids), 0, False, cut, record.source))
        report.add(sequences[-1])
    return sequences, report
