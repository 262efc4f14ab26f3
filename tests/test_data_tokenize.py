"""fastrlhf.data.tokenize: exact prompt/response boundaries, truncation sides, chat templates, reports.

The tokenizer is a byte-level BPE trained here on a few sentences (no downloads). Byte-level BPE decodes
back to exactly the text it encoded, so "the prompt part decodes to the formatted prompt" is a real check
of where the boundary falls, independent of how tokenize.py builds the ids.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fastrlhf.data import ChatExample, DataError, PromptExample, RankedExample, SFTExample, TextExample
from fastrlhf.data.tokenize import (
    TokenizedSequence,
    TruncationPolicy,
    tokenize_prompt,
    tokenize_prompt_response,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
    tokenize_texts,
)

CORPUS = [
    "write me a song about an ox plowing a field of data",
    "the quick brown fox jumps over the lazy dog",
    "Oh ox, you plow the rows; the numbers grow.",
    "system: be brief. user: hi. assistant: hello there!",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
# A minimal Jinja template in the usual shape: bos, one tagged block per message, the assistant tag as the
# generation prompt.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LOOSE = TruncationPolicy(max_prompt_tokens=10_000, max_response_tokens=10_000)


@pytest.fixture(scope="module")
def trained() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def wrap(serialized: str, bos: bool = True, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(serialized)
    if bos:  # like Llama: the tokenizer itself prepends <s>
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = chat_template
    return hf


@pytest.fixture
def plain(trained):
    return wrap(trained)


@pytest.fixture
def chat(trained):
    return wrap(trained, chat_template=TEMPLATE)


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def parts(tokenizer, sequence: TokenizedSequence) -> tuple[str, str]:
    ids = list(sequence.input_ids)
    p = sequence.prompt_length
    return tokenizer.decode(ids[:p]), tokenizer.decode(ids[p:])


def test_boundary_is_exact_without_a_chat_template(plain):
    prompt, response = "write me a song about an ox", " Oh ox, you plow the rows!"
    seq = tokenize_prompt_response(plain, prompt, response, LOOSE, source="f.jsonl:1")
    assert parts(plain, seq) == ("<s>" + prompt, response + "</s>")
    assert list(seq.input_ids) == [plain.bos_token_id] + text_ids(plain, prompt) + text_ids(
        plain, response
    ) + [plain.eos_token_id]
    assert seq.prompt_length == 1 + len(text_ids(plain, prompt))
    assert (seq.truncated_prompt, seq.truncated_response, seq.source) == (False, False, "f.jsonl:1")


def test_no_bos_when_the_tokenizer_adds_none(trained):
    tok = wrap(trained, bos=False)
    seq = tokenize_prompt_response(tok, "the lazy dog", "jumps", LOOSE)
    assert list(seq.input_ids[: seq.prompt_length]) == text_ids(tok, "the lazy dog")
    assert parts(tok, seq) == ("the lazy dog", "jumps</s>")


def test_chat_template_formats_the_prompt(chat):
    prompt, response = "write me a song", "Oh ox."
    seq = tokenize_prompt_response(chat, prompt, response, LOOSE)
    rendered = f"<s><|user|>{prompt}\n<|assistant|>"  # TEMPLATE by hand
    assert parts(chat, seq) == (rendered, response + "</s>")
    # the special tags are single tokens, as the template's author meant
    assert list(seq.input_ids[: seq.prompt_length]) == text_ids(chat, rendered)
    assert chat.convert_tokens_to_ids("<|assistant|>") == seq.input_ids[seq.prompt_length - 1]


def test_chat_example_multi_turn_keeps_roles(chat, plain):
    messages = (
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello there"),
        ("user", "a song about an ox?"),
        ("assistant", "Oh ox, you plow."),
    )
    record = ChatExample(messages, source="chat.jsonl:4")
    (templated,), report = tokenize_sft([record], chat, LOOSE)
    assert parts(chat, templated) == (
        "<s><|system|>be brief\n<|user|>hi\n<|assistant|>hello there\n<|user|>a song about an ox?\n"
        "<|assistant|>",
        "Oh ox, you plow.</s>",
    )
    (rendered,), _ = tokenize_sft([record], plain, LOOSE)
    assert parts(plain, rendered) == (
        "<s>system: be brief\nuser: hi\nassistant: hello there\nuser: a song about an ox?\nassistant:",
        "Oh ox, you plow.</s>",
    )
    assert (report.examples, report.sequences, templated.source) == (1, 1, "chat.jsonl:4")


def test_long_prompt_keeps_its_end_and_its_bos(plain, trained):
    prompt = " ".join(CORPUS)
    full = text_ids(plain, prompt)
    policy = TruncationPolicy(max_prompt_tokens=12, max_response_tokens=50)
    seq = tokenize_prompt_response(plain, prompt, "ok", policy)
    assert seq.truncated_prompt and not seq.truncated_response
    assert list(seq.input_ids[: seq.prompt_length]) == [plain.bos_token_id] + full[-11:]
    assert prompt.endswith(plain.decode(full[-11:]))

    no_bos = wrap(trained, bos=False)
    seq = tokenize_prompt_response(no_bos, prompt, "ok", policy)
    assert list(seq.input_ids[: seq.prompt_length]) == full[-12:]
    assert tokenize_prompt(no_bos, prompt, policy) == tuple(full[-12:])


def test_long_response_keeps_its_beginning_and_has_no_eos(plain):
    response = " ".join(CORPUS)
    full = text_ids(plain, response)
    seq = tokenize_prompt_response(plain, "p", response, TruncationPolicy(max_response_tokens=7))
    assert seq.truncated_response and not seq.truncated_prompt
    assert list(seq.response_ids) == full[:7]
    assert plain.eos_token_id not in seq.response_ids
    assert response.startswith(plain.decode(full[:7]))


@pytest.mark.parametrize("spare", [-1, 0, 1])
def test_eos_only_when_the_whole_response_fits(plain, spare):
    response = "the quick brown fox"
    n = len(text_ids(plain, response))
    limit = n + 1 + spare  # n + 1 = the response and its eos exactly
    seq = tokenize_prompt_response(plain, "p", response, TruncationPolicy(max_response_tokens=limit))
    fits = spare >= 0
    assert seq.truncated_response is not fits
    assert (seq.response_ids[-1] == plain.eos_token_id) is fits
    assert len(seq.response_ids) == (n + 1 if fits else limit)


def test_report_counts_against_the_sequences(plain):
    long_text = " ".join(CORPUS)
    records = [
        SFTExample("write me a song", "Oh ox", source="a:1"),
        SFTExample(long_text, "fine", source="a:2"),
        SFTExample("hi", long_text, source="a:3"),
        SFTExample(long_text, long_text, source="a:4"),
    ]
    policy = TruncationPolicy(max_prompt_tokens=16, max_response_tokens=9)
    sequences, report = tokenize_sft(records, plain, policy)
    assert [s.source for s in sequences] == ["a:1", "a:2", "a:3", "a:4"]
    assert [s.truncated_prompt for s in sequences] == [False, True, False, True]
    assert [s.truncated_response for s in sequences] == [False, False, True, True]
    expected = {
        "examples": 4,
        "sequences": 4,
        "truncated_prompts": 2,
        "truncated_responses": 2,
        "prompt_tokens": sum(s.prompt_length for s in sequences),
        "response_tokens": sum(len(s.input_ids) - s.prompt_length for s in sequences),
        "max_length": 16 + 9,
    }
    assert report.as_dict() == expected
    line = str(report)
    assert "\n" not in line and "4 examples" in line and "2 prompts" in line
    # batch tokenisation gives what one-at-a-time does
    for record, seq in zip(records, sequences, strict=True):
        assert seq == tokenize_prompt_response(plain, record.prompt, record.response, policy, record.source)


def test_empty_response_names_the_line(plain, chat):
    with pytest.raises(DataError, match=r"data\.jsonl:7: .*empty") as info:
        records = [SFTExample("p", "ok", source="data.jsonl:6"), SFTExample("p", "", source="data.jsonl:7")]
        tokenize_sft(records, plain, LOOSE)
    assert (info.value.path, info.value.line) == ("data.jsonl", 7)
    with pytest.raises(DataError, match="x.jsonl:2"):
        tokenize_prompt_response(chat, "p", "", LOOSE, source="x.jsonl:2")
    with pytest.raises(DataError, match="t.jsonl:9"):
        tokenize_texts([TextExample("", source="t.jsonl:9")], plain, 8)


def test_ranked_groups_share_the_prompt(plain):
    record = RankedExample(
        "a song about an ox", ("Oh ox", "moo", "the quick brown fox"), (2, 1, 3), "u", "r:3"
    )
    other = RankedExample("the lazy dog", ("jumps", "sleeps"), (1, 2), None, "r:4")
    groups, report = tokenize_ranked([record, other], plain, LOOSE)
    assert [g.source for g in groups] == ["r:3", "r:4"]
    assert groups[0].rankings == (2, 1, 3) and groups[1].rankings == (1, 2)
    for group, example in zip(groups, [record, other], strict=True):
        assert len(group.sequences) == len(example.texts)
        for seq, text in zip(group.sequences, example.texts, strict=True):
            assert parts(plain, seq) == ("<s>" + example.prompt, text + "</s>")
    assert (report.examples, report.sequences) == (2, 5)


def test_texts_are_all_response(plain):
    text = "the quick brown fox jumps over the lazy dog"
    full = text_ids(plain, text)
    (seq,), report = tokenize_texts([TextExample(text, "t:1")], plain, max_tokens=1000)
    assert seq.prompt_length == 0 and not seq.truncated_response
    assert list(seq.input_ids) == [plain.bos_token_id] + full + [plain.eos_token_id]
    (cut,), report = tokenize_texts([TextExample(text, "t:1")], plain, max_tokens=5)
    assert list(cut.input_ids) == [plain.bos_token_id] + full[:4] and cut.truncated_response
    assert report.truncated_responses == 1 and report.response_tokens == 5
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_texts([], plain, 0)


def test_prompts_for_generation(chat):
    policy = TruncationPolicy(max_prompt_tokens=64)
    ids = tokenize_prompt(chat, "write me a song", policy)
    seq = tokenize_prompt_response(chat, "write me a song", "la", policy)
    assert ids == seq.input_ids[: seq.prompt_length]
    (prompt,), report = tokenize_prompts([PromptExample("write me a song", source="p:1")], chat, policy)
    assert prompt.input_ids == ids and prompt.prompt_length == len(ids) and prompt.response_ids == ()
    assert report.response_tokens == 0 and report.prompt_tokens == len(ids)


@pytest.mark.parametrize("field", ["max_prompt_tokens", "max_response_tokens"])
@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_policy_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TruncationPolicy(**{field: value})


def test_tokenizer_without_eos_is_refused(trained):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(trained))
    with pytest.raises(ValueError, match="eos"):
        tokenize_prompt_response(tok, "p", "r", LOOSE)
