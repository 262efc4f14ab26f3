"""JSONL readers for the seed's formats and the common extras, with line-exact errors.

| kind     | one JSON object per line                                   | record          |
|----------|------------------------------------------------------------|-----------------|
| "sft"    | ``{"prompt", "response"}``                                 | SFTExample      |
| "rm"     | ``{"prompt", "responses": [{"text", "ranking"}, ...]}``    | RankedExample   |
| "pairs"  | ``{"prompt", "chosen", "rejected"}``                       | RankedExample   |
| "ppo"    | ``{"prompt"}`` (extra fields ignored)                      | PromptExample   |
| "ptx"    | ``{"text"}``                                               | TextExample     |
| "chat"   | ``{"messages": [{"role", "content"}, ...]}``               | ChatExample     |

An optional ``"user"`` field (any JSON scalar) feeds the dataset hygiene (per-user caps and splits).
Every problem raises ``DataError`` naming the file, the line and what is wrong; blank lines are skipped.
Files are read line by line as bytes: a byte that is not UTF-8 is reported at its line and column, and a
line longer than the process's limit (``set_max_line_mib``; every command's ``--max-line-mib``, default
64 MiB) is refused at its line without being read whole.
"""

from __future__ import annotations

import json
import math
import os

from fastrlhf.data.records import ChatExample, PromptExample, RankedExample, SFTExample, TextExample
from fastrlhf.errors import InputError

MAX_LINE_MIB_DEFAULT = 64
MIN_RESPONSES, MAX_RESPONSES = 2, 9  # InstructGPT ranked K = 4..9 responses; K = 2 is a plain pair
CHAT_ROLES = ("system", "user", "assistant")


class DataError(InputError):
    """A bad line (or file): ``path:line: problem``."""

    def __init__(self, path: str, line: int | None, problem: str):
        self.path, self.line, self.problem = path, line, problem
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {problem}")


def read_jsonl(path: str | os.PathLike, kind: str) -> list:
    """Every record of ``path`` as ``kind`` (see the module table). Raises ``DataError`` on the first bad
    line, and when the file is missing or holds no record."""
    if kind not in PARSERS:
        raise ValueError(f"kind={kind!r} is not one of {tuple(PARSERS)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    parse = PARSERS[kind]
    limit = max_line_bytes()
    records = []
    with open(path, "rb") as fh:
        for number, data in enumerate(iter(lambda: fh.readline(limit + 1), b""), start=1):
            if len(data) > limit and not data.endswith(b"\n"):
                raise DataError(
                    path, number, f"line longer than {limit} bytes (raise --max-line-mib to allow it)"
                )
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(data[: exc.start].decode("utf-8", "replace")) + 1
                raise DataError(
                    path, number, f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column})"
                ) from None
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            records.append(parse(obj, _Line(path, number)))
    if not records:
        raise DataError(path, None, f"no {kind} records (the file is empty)")
    return records


_max_line_bytes = MAX_LINE_MIB_DEFAULT * 2**20


def set_max_line_mib(mib: float) -> None:
    """Set the longest line every reader of this process accepts, in MiB (the CLI's ``--max-line-mib``)."""
    global _max_line_bytes
    if isinstance(mib, bool) or not isinstance(mib, int | float) or not math.isfinite(mib) or mib <= 0:
        raise InputError(f"max_line_mib must be a finite number of MiB > 0, got {mib!r}")
    _max_line_bytes = max(1, int(mib * 2**20))


def max_line_bytes() -> int:
    """The longest line a reader accepts, in bytes."""
    return _max_line_bytes


class _Line:
    """Field access for one line, raising ``DataError`` with the line's position."""

    def __init__(self, path: str, number: int):
        self.path, self.number = path, number
        self.source = f"{path}:{number}"

    def error(self, problem: str) -> DataError:
        return DataError(self.path, self.number, problem)

    def text(self, obj: dict, field: str, where: str = "") -> str:
        if field not in obj:
            raise self.error(f"missing field {where}{field!r}")
        value = obj[field]
        if not isinstance(value, str):
            raise self.error(f"field {where}{field!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise self.error(f"field {where}{field!r} is empty")
        return value

    def user(self, obj: dict) -> str | None:
        value = obj.get("user")
        if value is None:
            return None
        if isinstance(value, (dict, list)):
            raise self.error("field 'user' must be a string or number")
        return str(value)


def _sft(obj: dict, line: _Line) -> SFTExample:
    return SFTExample(line.text(obj, "prompt"), line.text(obj, "response"), line.user(obj), line.source)


def _rm(obj: dict, line: _Line) -> RankedExample:
    prompt = line.text(obj, "prompt")
    if "responses" not in obj:
        raise line.error("missing field 'responses'")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise line.error(f"field 'responses' must be a list, got {type(responses).__name__}")
    if not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
        raise line.error(
            f"'responses' has {len(responses)} entries; a ranking needs {MIN_RESPONSES} to {MAX_RESPONSES}"
        )
    texts, rankings = [], []
    for i, response in enumerate(responses):
        where = f"responses[{i}]."
        if not isinstance(response, dict):
            raise line.error(f"responses[{i}] must be an object with 'text' and 'ranking'")
        texts.append(line.text(response, "text", where))
        if "ranking" not in response:
            raise line.error(f"missing field {where}'ranking'")
        ranking = response["ranking"]
        # JSON 2.0 parses as a float; bool is an int subclass in Python: both are rejected on purpose.
        if isinstance(ranking, bool) or not isinstance(ranking, int):
            raise line.error(f"{where}ranking must be an integer (1 = best), got {ranking!r}")
        if ranking < 1:
            raise line.error(f"{where}ranking must be >= 1 (1 = best), got {ranking}")
        rankings.append(ranking)
    if len(set(rankings)) == 1:
        raise line.error("every response has the same ranking: there is no preference to learn")
    return RankedExample(prompt, tuple(texts), tuple(rankings), line.user(obj), line.source)


def _pairs(obj: dict, line: _Line) -> RankedExample:
    prompt = line.text(obj, "prompt")
    chosen, rejected = line.text(obj, "chosen"), line.text(obj, "rejected")
    return RankedExample(prompt, (chosen, rejected), (1, 2), line.user(obj), line.source)


def _ppo(obj: dict, line: _Line) -> PromptExample:
    return PromptExample(line.text(obj, "prompt"), line.user(obj), line.source)


def _ptx(obj: dict, line: _Line) -> TextExample:
    return TextExample(line.text(obj, "text"), line.source)


def _chat(obj: dict, line: _Line) -> ChatExample:
    if "messages" not in obj:
        raise line.error("missing field 'messages'")
    messages = obj["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise line.error("'messages' must be a list of at least 2 {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise line.error(f"messages[{i}] must be an object with 'role' and 'content'")
        role = line.text(message, "role", f"messages[{i}].")
        if role not in CHAT_ROLES:
            raise line.error(f"messages[{i}].role is {role!r}; expected one of {CHAT_ROLES}")
        out.append((role, line.text(message, "content", f"messages[{i}].")))
    if out[-1][0] != "assistant":
        raise line.error("the last message must be the assistant's (it is the response to learn)")
    return ChatExample(tuple(out), line.user(obj), line.source)


PARSERS = {"sft": _sft, "rm": _rm, "pairs": _pairs, "ppo": _ppo, "ptx": _ptx, "chat": _chat}
