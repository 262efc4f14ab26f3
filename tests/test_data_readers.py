"""fastrlhf.data readers: every format reads back what was written, and every bad line names the file,
the line and the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastrlhf.data import DataError, RankedExample, read_jsonl


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_seed_formats_read_back(tmp_path):
    sft = write_lines(
        tmp_path, [{"prompt": "write me a song about an ox", "response": "Oh ox...", "user": 7}]
    )
    rm = write_lines(
        tmp_path,
        [
            {
                "prompt": "write me a song about an ox plowing a field of data",
                "responses": [
                    {"text": "a", "ranking": 3},
                    {"text": "b", "ranking": 1},
                    {"text": "c", "ranking": 2},
                ],
            }
        ],
        "rm.jsonl",
    )
    ppo = write_lines(tmp_path, [{"prompt": "write me a song about an ox", "extra": [1, 2]}, ""], "ppo.jsonl")
    (example,) = read_jsonl(sft, "sft")
    assert (example.prompt, example.response, example.user) == (
        "write me a song about an ox",
        "Oh ox...",
        "7",
    )
    assert example.source.endswith("data.jsonl:1")
    (ranked,) = read_jsonl(rm, "rm")
    assert ranked.texts == ("a", "b", "c") and ranked.rankings == (3, 1, 2) and ranked.best == "b"
    (prompt,) = read_jsonl(ppo, "ppo")
    assert prompt.prompt == "write me a song about an ox"


def test_extra_formats(tmp_path):
    pairs = write_lines(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    ptx = write_lines(tmp_path, [{"text": "the quick brown ox"}], "ptx.jsonl")
    chat = write_lines(
        tmp_path,
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
        "chat.jsonl",
    )
    assert read_jsonl(pairs, "pairs") == [RankedExample("p", ("good", "bad"), (1, 2), None, f"{pairs}:1")]
    assert read_jsonl(ptx, "ptx")[0].text == "the quick brown ox"
    assert read_jsonl(chat, "chat")[0].messages == (("user", "hi"), ("assistant", "hello"))


GOOD_RM = {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b", "ranking": 2}]}


@pytest.mark.parametrize(
    "kind, bad, problem",
    [
        ("sft", '{"prompt": "p", "response": ', "invalid JSON"),
        ("sft", "[1, 2]", "expected a JSON object"),
        ("sft", {"prompt": "p"}, "missing field 'response'"),
        ("sft", {"prompt": "p", "response": "   "}, "field 'response' is empty"),
        ("sft", {"prompt": 3, "response": "r"}, "field 'prompt' must be a string"),
        ("rm", {"prompt": "p"}, "missing field 'responses'"),
        ("rm", {"prompt": "p", "responses": [{"text": "a", "ranking": 1}]}, "a ranking needs 2 to 9"),
        ("rm", {"prompt": "p", "responses": [{"text": "a", "ranking": 1}] * 10}, "has 10 entries"),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b", "ranking": 1.5}]},
            "ranking must be an integer",
        ),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b", "ranking": "2"}]},
            "ranking must be an integer",
        ),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b", "ranking": 0}]},
            "ranking must be >= 1",
        ),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "", "ranking": 2}]},
            "field responses[1].'text' is empty",
        ),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 2}, {"text": "b", "ranking": 2}]},
            "same ranking",
        ),
        (
            "rm",
            {"prompt": "p", "responses": [{"text": "a", "ranking": 1}, {"text": "b"}]},
            "missing field responses[1].'ranking'",
        ),
        ("pairs", {"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
        ("ppo", {"question": "q"}, "missing field 'prompt'"),
        ("ptx", {"text": ""}, "field 'text' is empty"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "at least 2"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "expected one of",
        ),
        (
            "chat",
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
            "last message must be the assistant",
        ),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path, kind, bad, problem):
    good = {
        "sft": {"prompt": "p", "response": "r"},
        "rm": GOOD_RM,
        "pairs": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "ppo": {"prompt": "p"},
        "ptx": {"text": "t"},
        "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    }[kind]
    path = write_lines(tmp_path, [good, "", good, bad, good])
    with pytest.raises(DataError) as info:
        read_jsonl(path, kind)
    assert info.value.path == path and info.value.line == 4
    assert str(info.value).startswith(f"{path}:4: ")
    assert problem in str(info.value), str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "absent.jsonl", "sft")
    with pytest.raises(DataError, match="no sft records"):
        read_jsonl(write_lines(tmp_path, ["", "  "]), "sft")
    with pytest.raises(ValueError, match="kind="):
        read_jsonl(write_lines(tmp_path, [{"prompt": "p"}]), "dpo")


def test_non_utf8_bytes_and_overlong_lines_are_reported_at_their_line(tmp_path, monkeypatch):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read_jsonl(path, "ppo")
    assert str(info.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column 16)"

    from fastrlhf.data import readers

    monkeypatch.setattr(readers, "_max_line_bytes", readers.max_line_bytes())  # restored afterwards
    readers.set_max_line_mib(100 / 2**20)  # 100 bytes
    long_line = json.dumps({"prompt": "x" * 200})
    path.write_text('{"prompt": "short"}\n' * 2 + long_line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":3: line longer than 100 bytes"):
        read_jsonl(path, "ppo")
    path.write_text('{"prompt": "short"}\n' * 2, encoding="utf-8")
    assert len(read_jsonl(path, "ppo")) == 2, "lines under the cap read as before"
    for bad in (0, -1.0, float("nan"), "lots"):
        with pytest.raises(ValueError, match="max_line_mib"):
            readers.set_max_line_mib(bad)


# ---- fuzzing: whatever the bytes, a reader returns records or a DataError at a line --------------------

KINDS = ("sft", "rm", "pairs", "ppo", "ptx", "chat")
FUZZ_EXAMPLES = 60  # per test; FUZZ_EXAMPLES x kinds x 2 tests inputs in all


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
    keys = st.sampled_from(
        [
            "prompt",
            "response",
            "responses",
            "text",
            "ranking",
            "chosen",
            "rejected",
            "messages",
            "role",
            "content",
            "user",
        ]
    ) | st.text(max_size=4)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=12,
    )


def _check_read(path, kind):
    try:
        records = read_jsonl(path, kind)
    except DataError as error:
        assert error.path == str(path)
        where = f"{path}:{error.line}: " if error.line is not None else f"{path}: "
        assert str(error).startswith(where), str(error)
        return
    assert records, "a reader that returns must return records"


def test_fuzzed_bytes_give_records_or_a_line_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(data=st.binary(max_size=300), kind=st.sampled_from(KINDS))
    def read_bytes(data, kind):
        path = tmp_path / "fuzz.jsonl"
        path.write_bytes(data)
        _check_read(path, kind)

    read_bytes()


def test_fuzzed_json_shapes_give_records_or_a_line_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(lines=st.lists(_json_values(), min_size=1, max_size=4), kind=st.sampled_from(KINDS))
    def read_shapes(lines, kind):
        path = tmp_path / "fuzz.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        _check_read(path, kind)

    read_shapes()


def test_reading_data_loads_no_torch():
    """Reading and tokenising JSONL needs no torch; the batching helpers load it on first use."""
    script = (
        "import sys\n"
        "import fastrlhf.data as data\n"
        "assert callable(data.read_jsonl) and callable(data.tokenize_sft)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert data.IGNORE_INDEX == -100 and callable(data.pad_batch) and 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
