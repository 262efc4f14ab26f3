"""fastrlhf.inference: generate_responses against HF's own generate on each prompt alone, EOS cutting, and
score_pairs against the reward model run on each pair alone."""

from __future__ import annotations

import copy

import pytest
import torch

from fastrlhf.data.records import SFTExample
from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompt_response
from fastrlhf.errors import InputError
from fastrlhf.inference.generate import generate_responses
from fastrlhf.inference.score import score_pairs
from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
from fastrlhf.models.reward_model import RewardModel
from fastrlhf.models.tiny import build_tiny_model
from fastrlhf.ops import reference

# A wide init (0.02 would give near-uniform logits) makes greedy decoding wander over many tokens.
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=128,
    initializer_range=0.3,
)
PAD, EOS, FIRST_ID = 0, 2, 6
NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("inference") / "small", seed=5, **SMALL)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_causal_lm(model_dir, ModelOptions())


def _prompts(vocab, lengths):
    return [tuple(torch.randint(FIRST_ID, vocab, (n,)).tolist()) for n in lengths]


def _hf_greedy(lm, prompt, eos_token_id, max_new_tokens=NEW) -> list[int]:
    """HF generate on the prompt alone (no padding, no mask), cut after the first eos."""
    was_training = lm.training
    lm.eval()
    with torch.no_grad():
        out = lm.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=PAD,
        )
    lm.train(was_training)
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


SAMPLERS = ["fastrlhf", "hf"]


def _response_logits(lm, result):
    """Float64 logits ``[R, V]`` of one full forward over prompt + response, at the positions that predict
    the R response tokens."""
    ids = torch.tensor([result.prompt_ids + result.response_ids])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0].double()
    return logits[len(result.prompt_ids) - 1 : -1]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("temperature", [0.6, 1.4])
def test_sampled_logprobs_are_the_tempered_softmax_of_a_full_forward(lm, temperature, sampler):
    """The log-probs recorded during cached decoding equal a float64 log-softmax of one full forward
    over prompt + response, at the sampling temperature, token by token."""
    prompts = _prompts(lm.config.vocab_size, [5, 1, 9, 3])
    torch.manual_seed(4)
    results = generate_responses(
        lm,
        prompts,
        pad_token_id=PAD,
        eos_token_id=EOS,
        max_new_tokens=NEW,
        temperature=temperature,
        return_logprobs=True,
        batch_size=3,  # two batches, the second with left padding against a longer first
        sampler=sampler,
    )
    lm.eval()
    for result in results:
        assert result.logprobs is not None and len(result.logprobs) == len(result.response_ids)
        expected = torch.log_softmax(_response_logits(lm, result) / temperature, dim=-1)
        expected = expected.gather(1, torch.tensor(result.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(
            torch.tensor(result.logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-4
        )
    if sampler == "hf":  # generate's scores are pre-warper: its log-probs need the whole tempered softmax
        with pytest.raises(InputError, match="return_logprobs"):
            generate_responses(
                lm,
                prompts,
                pad_token_id=PAD,
                eos_token_id=EOS,
                temperature=0.0,
                return_logprobs=True,
                sampler="hf",
            )


def test_lean_sampler_logprobs_follow_the_truncated_distribution(lm):
    """With top-p, the lean loop's log-probs are those of the nucleus it drew from (renormalised), checked
    against a float64 full forward truncated by the reference's rule; every token lies in its nucleus."""
    prompts = _prompts(lm.config.vocab_size, [5, 2, 7])
    torch.manual_seed(8)
    results = generate_responses(
        lm,
        prompts,
        pad_token_id=PAD,
        eos_token_id=EOS,
        max_new_tokens=NEW,
        temperature=0.8,
        top_p=0.7,
        return_logprobs=True,
    )
    lm.eval()
    for result in results:
        t, kept, _ = reference.truncated_support(_response_logits(lm, result), 0.8, 0, 0.7)
        nucleus = torch.where(kept, t, -torch.inf).log_softmax(-1)
        response = torch.tensor(result.response_ids)[:, None]
        assert bool(kept.gather(1, response).all()), "a token outside its nucleus"
        torch.testing.assert_close(
            torch.tensor(result.logprobs, dtype=torch.float64),
            nucleus.gather(1, response)[:, 0],
            rtol=0,
            atol=1e-4,
        )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_greedy_matches_hf_on_each_prompt_alone(lm, sampler):
    prompts = _prompts(lm.config.vocab_size, [5, 1, 9, 3, 7])
    results = generate_responses(
        lm, prompts, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=NEW, temperature=0.0, sampler=sampler
    )
    assert [r.prompt_ids for r in results] == prompts
    for prompt, result in zip(prompts, results, strict=True):
        expected = _hf_greedy(lm, prompt, EOS)
        assert list(result.response_ids) == expected
        assert result.ended_with_eos == (EOS in expected)
    assert len({r.response_ids for r in results}) > 1  # the model does not ignore its prompt
    # deterministic, and independent of how the prompts are batched (so of the left padding)
    again = generate_responses(
        lm,
        prompts,
        pad_token_id=PAD,
        eos_token_id=EOS,
        max_new_tokens=NEW,
        temperature=0.0,
        batch_size=2,
        sampler=sampler,
    )
    assert again == results


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_responses_are_cut_after_the_first_eos(lm, sampler):
    """Also how the lean loop drops finished rows from its batch and KV cache: the others must go on
    exactly as HF decodes them alone."""
    prompts = _prompts(lm.config.vocab_size, [4, 8, 2, 6, 5])
    baseline = generate_responses(
        lm, prompts, pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=NEW, temperature=0.0
    )
    # Declare as eos a token that greedy decoding emits mid-way through one response but never in another,
    # unended one: the first response then deterministically ends there while the other keeps going (and
    # is padded by generate).
    candidates = (
        (i, k, tokens[k])
        for i, tokens in enumerate(r.response_ids for r in baseline)
        for k in range(1, len(tokens))
        if tokens[k] not in (PAD, EOS, *tokens[:k])
        and any(not o.ended_with_eos and tokens[k] not in o.response_ids for o in baseline)
    )
    i, k, eos = next(candidates, (None, None, None))
    assert eos is not None, f"no usable eos candidate in {baseline}"
    results = generate_responses(
        lm, prompts, pad_token_id=PAD, eos_token_id=eos, max_new_tokens=NEW, temperature=0.0, sampler=sampler
    )
    assert results[i].response_ids == baseline[i].response_ids[: k + 1] and results[i].ended_with_eos
    assert any(not r.ended_with_eos for r in results), "every prompt ended; the cut of pads is untested"
    for prompt, result in zip(prompts, results, strict=True):
        tokens = list(result.response_ids)
        assert tokens == _hf_greedy(lm, prompt, eos)
        if result.ended_with_eos:
            assert tokens[-1] == eos and eos not in tokens[:-1]
        else:
            assert len(tokens) == NEW and eos not in tokens


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_is_seeded_and_restores_the_mode(lm, sampler):
    prompts = _prompts(lm.config.vocab_size, [3, 6, 5])
    lm.train()
    kwargs = dict(
        pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=NEW, temperature=1.3, top_p=0.9, sampler=sampler
    )
    first = generate_responses(lm, prompts, generator_seed=11, **kwargs)
    assert lm.training and all(m.training for m in lm.modules())
    assert generate_responses(lm, prompts, generator_seed=11, **kwargs) == first
    lm.eval()
    greedy = generate_responses(lm, prompts, pad_token_id=PAD, eos_token_id=EOS, temperature=0.0)
    assert not lm.training and not any(m.training for m in lm.modules())
    assert all(1 <= len(r.response_ids) <= 64 for r in greedy)
    lm.train()


def test_greedy_through_lora_adapters(model_dir, lm):
    adapted = load_causal_lm(model_dir, ModelOptions(lora_r=4))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters change the model
                p.normal_(0, 0.5)
    merged = copy.deepcopy(adapted).merge_and_unload()
    prompts = _prompts(lm.config.vocab_size, [6, 3, 8])
    kwargs = dict(pad_token_id=PAD, eos_token_id=EOS, max_new_tokens=NEW, temperature=0.0)
    results = generate_responses(adapted, prompts, **kwargs)
    assert adapted.training
    assert [list(r.response_ids) for r in results] == [_hf_greedy(merged, p, EOS) for p in prompts]
    assert results != generate_responses(lm, prompts, **kwargs)  # the adapters are used


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"sampler": "vllm"}, "sampler must be one of"),
    ],
)
def test_generate_rejects_bad_arguments(lm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_responses(lm, [(7, 8)], pad_token_id=PAD, eos_token_id=EOS, **kwargs)


def test_score_pairs_equals_the_reward_model_on_each_pair(model_dir):
    tokenizer = load_tokenizer(model_dir)
    rm = RewardModel.from_pretrained(model_dir)
    rm.set_normalization_bias(0.3)
    records = [
        SFTExample("What is 3 plus 4?", "3 plus 4 is 7."),
        SFTExample("Hi", "Hello there, how can I help you today with anything at all?"),
        SFTExample("Spell the word cat.", "c a t"),
        SFTExample("Name a colour.", "Blue."),
        SFTExample("Say nothing long.", "Ok"),
    ]
    policy = TruncationPolicy(max_prompt_tokens=32, max_response_tokens=10)
    rm.train()
    scores = score_pairs(rm, tokenizer, records, policy, batch_size=2)
    assert rm.training
    assert len(scores) == len(records) and all(isinstance(s, float) for s in scores)
    rm.eval()
    with torch.no_grad():
        expected = [
            rm(
                input_ids=torch.tensor(
                    [tokenize_prompt_response(tokenizer, r.prompt, r.response, policy).input_ids]
                )
            ).item()
            for r in records
        ]
    assert scores == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert len(set(scores)) == len(scores)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_follows_the_full_distribution_not_a_top_k_cut(lm, sampler):
    """PPO's log-probs assume samples from the policy itself: transformers' default top-k of 50 must be off.

    At temperature 3 the first-token distribution puts much of its mass outside its 50 likeliest tokens;
    the share of samples that land there must match that mass (a top-50 cut would make it 0).
    """
    prompt = _prompts(lm.config.vocab_size, [4])[0]
    with torch.no_grad():
        logits = lm.eval()(input_ids=torch.tensor([prompt])).logits[0, -1] / 3.0
    probs = logits.double().softmax(-1)
    top50 = set(probs.topk(50).indices.tolist())
    mass_outside = 1.0 - float(probs[list(top50)].sum())
    assert mass_outside > 0.3, "the test needs a flat enough distribution"
    draws = 400
    responses = generate_responses(
        lm,
        [prompt] * draws,
        pad_token_id=PAD,
        eos_token_id=EOS,
        max_new_tokens=1,
        temperature=3.0,
        batch_size=draws,
        sampler=sampler,
    )
    outside = sum(r.response_ids[0] not in top50 for r in responses) / draws
    # Binomial standard error at these sizes is below 0.025; 5 of them is a safe band.
    assert abs(outside - mass_outside) < 0.125, (outside, mass_outside)
