"""The embedded ``tiny`` model and tokenizer: built locally, loadable with the Auto classes, deterministic,
with a chat template the trainers can mask on, and resolved without any hub access."""

from __future__ import annotations

import json
import os
import statistics
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastrlhf.data import read_jsonl
from fastrlhf.data.synthetic import SAMPLE_DIR
from fastrlhf.models import tiny


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built)


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_reloads_and_runs_forward(built, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(built)
    assert model.config.model_type == "llama" and not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer) == tiny.VOCAB_SIZE
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    batch = tokenizer(["What is 3 plus 4?", "Spell the word cat."], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    # An untrained model is close to uniform over the vocabulary.
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.5


def test_same_seed_same_weights_and_global_rng_untouched(tmp_path, built):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    reference, same, different = _weights(built), _weights(again), _weights(other)
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not torch.equal(reference["model.embed_tokens.weight"], different["model.embed_tokens.weight"])


def test_overrides_reach_the_config(tmp_path):
    path = tiny.build_tiny_model(tmp_path / "small", num_hidden_layers=2, hidden_size=64)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 352)


def test_special_tokens_and_byte_level_round_trip(tokenizer):
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in zip(
            ("pad", "bos", "eos", "system", "user", "assistant"), tiny.SPECIAL_TOKENS, strict=True
        )
    }
    assert ids == {"pad": 0, "bos": 1, "eos": 2, "system": 3, "user": 4, "assistant": 5}
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "naïve café 🙂,\ttabs\n  two  spaces  and <angle> text 12345."
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id] + encoded  # Llama-style bos on encode
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_chat_template_prompt_is_a_token_prefix_of_the_conversation(tokenizer):
    prompt = [{"role": "user", "content": "What day comes after Monday?"}]
    conversation = prompt + [{"role": "assistant", "content": "The day after Monday is Tuesday."}]
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>What day comes after Monday?<|assistant|>"
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert full == text + "The day after Monday is Tuesday.<|eos|>"
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    full_ids = tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
    # SFT masks the prompt by length: the prompt's tokens must be exactly the start of the conversation's.
    assert full_ids[: len(prompt_ids)] == prompt_ids and full_ids[-1] == tokenizer.eos_token_id
    assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + prompt, tokenize=False
    )
    assert with_system.startswith("<|bos|><|system|>Be brief.<|user|>")


def test_committed_tokenizer_matches_a_fresh_build(tmp_path):
    tiny.build_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "chat_template.jinja"):
        with (
            open(tmp_path / name, encoding="utf-8") as fresh,
            open(os.path.join(tiny.TOKENIZER_DIR, name), encoding="utf-8") as committed,
        ):
            assert fresh.read() == committed.read(), (
                f"{name} is stale; run `python -m fastrlhf.models.tiny tokenizer`"
            )
    total = sum(os.path.getsize(os.path.join(tiny.TOKENIZER_DIR, f)) for f in os.listdir(tiny.TOKENIZER_DIR))
    assert total < 200_000


def test_sample_conversations_are_short(tokenizer):
    lengths = []
    for example in read_jsonl(os.path.join(SAMPLE_DIR, "sft.jsonl"), "sft"):
        messages = [
            {"role": "user", "content": example.prompt},
            {"role": "assistant", "content": example.response},
        ]
        lengths.append(len(tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]))
    assert statistics.mean(lengths) < 24 and max(lengths) < 48


def test_resolve_model_local_dirs_and_errors(tmp_path, built):
    assert tiny.resolve_model(built) == built
    with pytest.raises(ValueError, match=r"model 'org/some-model': not a local directory .*no hub downloads"):
        tiny.resolve_model("org/some-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        tiny.resolve_model(tmp_path / "empty")


def test_resolve_tiny_builds_once_under_fastrlhf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_HOME", str(tmp_path / "home"))
    path = tiny.resolve_model("tiny")
    assert path == str(tmp_path / "home" / tiny.TINY_CACHE_DIR)
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == tiny.VOCAB_SIZE

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was built again")

    monkeypatch.setattr(tiny, "tiny_config", no_rebuild)
    assert tiny.resolve_model("tiny") == path
    assert os.listdir(tmp_path / "home") == [tiny.TINY_CACHE_DIR]  # no temporary directory left behind


def test_existing_model_is_kept_and_concurrent_builders_agree(tmp_path, built):
    # A model already at the target stays as it is, whatever the new seed.
    assert tiny.build_tiny_model(built, seed=5) == built
    target = tmp_path / "shared"
    results, errors = [], []

    def build(seed):
        try:
            results.append(tiny.build_tiny_model(target, seed=seed))
        except Exception as exc:  # collected: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(seed,)) for seed in (0, 1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [str(target)] * 3
    assert os.listdir(tmp_path) == ["shared"]
    kept = _weights(target)["model.embed_tokens.weight"]
    assert any(
        torch.equal(
            kept, _weights(tiny.build_tiny_model(tmp_path / f"s{s}", seed=s))["model.embed_tokens.weight"]
        )
        for s in (0, 1, 2)
    )


def test_non_model_directory_is_not_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no model"):
        tiny.build_tiny_model(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]
