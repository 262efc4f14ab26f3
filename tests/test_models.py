"""fastrlhf.models: the scalar head, the policy's log-probs, dropout, loading options, LoRA and the reward
model, each checked against HF's own forward (logits + log_softmax in float64) or a plain loop."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fastrlhf.data.batching import IGNORE_INDEX, model_inputs, pack_batch, pad_batch
from fastrlhf.data.tokenize import TokenizedSequence
from fastrlhf.models import loading
from fastrlhf.models.dropout import BRANCH_OUTPUT_NAMES, apply_dropout
from fastrlhf.models.eval_mode import evaluating
from fastrlhf.models.heads import ScalarHead, last_token_index
from fastrlhf.models.loading import (
    ModelOptions,
    load_causal_lm,
    load_tokenizer,
    resolve_attention,
    resolve_dtype,
)
from fastrlhf.models.policy import CausalLMPolicy, decoder_and_head
from fastrlhf.models.reward_model import RewardModel, is_reward_model
from fastrlhf.models.tiny import build_tiny_model

LAYERS = 2
# Small enough for a loaded 2-core machine; a non-power-of-two MLP width and GQA keep it a real Llama.
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=128,
)
FIRST_ID = 6  # ids below are the tiny tokenizer's special tokens (pad 0, bos 1, eos 2, ...)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "small", seed=3, **SMALL)


def _lm(model_dir, **options):
    return load_causal_lm(model_dir, ModelOptions(**options))


def _sequences(vocab: int, lengths, prompt_lengths) -> list[TokenizedSequence]:
    return [
        TokenizedSequence(tuple(torch.randint(FIRST_ID, vocab, (n,)).tolist()), p)
        for n, p in zip(lengths, prompt_lengths, strict=True)
    ]


def _reference_logprobs(lm64, sequences, temperature: float = 1.0):
    """float64 log_softmax of HF's logits, each sequence run alone and unpadded, gathered at the response
    tokens in row-major order, plus the entropies there."""
    logprobs, entropies = [], []
    for seq in sequences:
        ids = torch.tensor([seq.input_ids])
        logits = lm64(input_ids=ids).logits[0].double() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(max(seq.prompt_length, 1) - 1, len(seq.input_ids) - 1):
            logprobs.append(logp[t, seq.input_ids[t + 1]])
            entropies.append(-(logp[t].exp() * logp[t]).sum())
    return torch.stack(logprobs), torch.stack(entropies)


# ---- ScalarHead / last_token_index ---------------------------------------------------------------------


def test_scalar_head_init_statistics():
    hidden = 4096
    head = ScalarHead(hidden)
    weight = head.proj.weight.detach().double()
    assert weight.shape == (1, hidden)
    expected_std = 1.0 / math.sqrt(hidden + 1)
    # the std of 4096 normal draws is within ~1.1% (one sigma) of the truth; 5% is > 4 sigma
    assert abs(weight.std().item() / expected_std - 1) < 0.05
    assert abs(weight.mean().item()) < 5 * expected_std / math.sqrt(hidden)
    assert torch.equal(head.proj.bias, torch.zeros(1))
    head.proj.bias.data.fill_(3.0)
    head.reset_parameters()
    assert torch.equal(head.proj.bias, torch.zeros(1))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 1)])
def test_scalar_head_shapes_and_fp32_output(shape):
    hidden_size = 13
    head = ScalarHead(hidden_size)
    with torch.no_grad():
        head.proj.bias.fill_(0.25)
    x = torch.randn(*shape, hidden_size)
    out = head(x)
    assert out.shape == shape and out.dtype == torch.float32
    expected = x.double() @ head.proj.weight.double()[0] + 0.25
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # bf16 activations (and a bf16 head) still give an fp32 score computed in fp32
    head16 = ScalarHead(hidden_size, dtype=torch.bfloat16)
    x16 = x.bfloat16()
    out16 = head16(x16)
    assert out16.dtype == torch.float32 and out16.shape == shape
    expected16 = x16.double() @ head16.proj.weight.double()[0]
    torch.testing.assert_close(out16.double(), expected16, atol=1e-5, rtol=1e-5)


def test_scalar_head_rejects_empty_hidden():
    with pytest.raises(ValueError, match="hidden_size"):
        ScalarHead(0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_index_matches_a_loop(side):
    batch, width = 9, 11
    lengths = torch.randint(1, width + 1, (batch,))
    lengths[0] = width  # a full row
    lengths[1] = 1
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, width - n :] = 1
    expected = [max(t for t in range(width) if mask[b, t]) for b in range(batch)]
    assert last_token_index(mask).tolist() == expected
    assert last_token_index(mask.bool()).tolist() == expected
    if side == "left":
        assert expected == [width - 1] * batch


# ---- CausalLMPolicy ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_pair(model_dir):
    lm = _lm(model_dir)
    lm.eval()
    lm64 = copy.deepcopy(lm).double()
    return lm, lm64


def _policy_batch(vocab):
    lengths = [9, 3, 14, 6, 1 + 1]
    prompts = [4, 1, 7, 0, 1]  # prompt 0 is pretraining text: every token after the first is predicted
    return _sequences(vocab, lengths, prompts)


@pytest.mark.parametrize("side", ["right", "left"])
def test_policy_logprobs_match_hf_logits(lm_pair, side):
    lm, lm64 = lm_pair
    sequences = _policy_batch(lm.config.vocab_size)
    batch = pad_batch(sequences, pad_token_id=0, padding_side=side)
    policy = CausalLMPolicy(lm)
    with torch.no_grad():
        logprobs, entropy = policy(batch["targets"], return_entropy=True, **model_inputs(batch))
        expected, expected_entropy = _reference_logprobs(lm64, sequences)
    assert logprobs.dtype == torch.float32
    assert (
        logprobs.shape
        == expected.shape
        == (sum(len(s.input_ids) - max(s.prompt_length, 1) for s in sequences),)
    )
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=2e-5, rtol=1e-5)


def test_policy_temperature(lm_pair):
    lm, lm64 = lm_pair
    sequences = _sequences(lm.config.vocab_size, [7, 12], [3, 5])
    batch = pad_batch(sequences, pad_token_id=0)
    with torch.no_grad():
        logprobs = CausalLMPolicy(lm)(batch["targets"], temperature=0.7, **model_inputs(batch))
        expected, _ = _reference_logprobs(lm64, sequences, temperature=0.7)
    torch.testing.assert_close(logprobs.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_padded(model_dir, attention):
    lm = _lm(model_dir, attn_implementation=attention)
    lm.eval()
    policy = CausalLMPolicy(lm)
    sequences = _policy_batch(lm.config.vocab_size)
    padded, packed = pad_batch(sequences, pad_token_id=0), pack_batch(sequences)
    assert "attention_mask" not in model_inputs(packed)
    with torch.no_grad():
        from_padded = policy(padded["targets"], **model_inputs(padded))
        from_packed = policy(packed["targets"], **model_inputs(packed))
    torch.testing.assert_close(from_packed, from_padded, atol=1e-5, rtol=1e-5)


def test_policy_gradients_match_autograd_through_hf_logits(lm_pair):
    lm, lm64 = lm_pair
    lm, lm64 = copy.deepcopy(lm), copy.deepcopy(lm64)
    sequences = _sequences(lm.config.vocab_size, [8, 13, 5], [3, 6, 1])
    batch = pad_batch(sequences, pad_token_id=0)
    n = int((batch["targets"] != IGNORE_INDEX).sum())
    weights = torch.randn(n, dtype=torch.float64)

    (CausalLMPolicy(lm)(batch["targets"], **model_inputs(batch)).double() * weights).sum().backward()
    expected, _ = _reference_logprobs(lm64, sequences)
    (expected * weights).sum().backward()

    _, head = decoder_and_head(lm)
    _, head64 = decoder_and_head(lm64)
    pairs = {
        "lm_head": (head.weight.grad, head64.weight.grad),
        "embedding": (lm.get_input_embeddings().weight.grad, lm64.get_input_embeddings().weight.grad),
        "layer0.q_proj": (
            lm.model.layers[0].self_attn.q_proj.weight.grad,
            lm64.model.layers[0].self_attn.q_proj.weight.grad,
        ),
    }
    for name, (grad, grad64) in pairs.items():
        assert grad is not None and grad64.abs().max() > 0, name
        scale = grad64.abs().max().item()
        torch.testing.assert_close(grad.double(), grad64, atol=1e-5 * scale, rtol=1e-4, msg=name)
    # rows of tokens never seen as input get no embedding gradient
    seen = {t for s in sequences for t in s.input_ids}
    unseen = [t for t in range(lm.config.vocab_size) if t not in seen]
    assert torch.equal(lm.get_input_embeddings().weight.grad[unseen], torch.zeros(len(unseen), 32))


# ---- dropout -------------------------------------------------------------------------------------------


def _branch_hooks(model) -> int:
    return sum(
        len(module._forward_hooks)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in BRANCH_OUTPUT_NAMES
    )


def test_dropout_hooks_on_llama(model_dir):
    lm = _lm(model_dir)
    ids = torch.randint(FIRST_ID, lm.config.vocab_size, (2, 10))
    lm.eval()
    with torch.no_grad():
        clean = lm(input_ids=ids).logits
    applied = apply_dropout(lm, 0.2)
    assert applied["branch_hooks"] == 2 * LAYERS == _branch_hooks(lm)
    assert applied["config_fields"] == ["attention_dropout"]
    assert lm.config.attention_dropout == 0.2
    assert all(layer.self_attn.attention_dropout == 0.2 for layer in lm.model.layers)

    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, clean)  # eval: dropout off, the model unchanged
        lm.train()
        first, second = lm(input_ids=ids).logits, lm(input_ids=ids).logits
    assert not torch.allclose(first, second) and not torch.allclose(first, clean)


def test_dropout_hook_drops_the_branch_output(model_dir):
    lm = _lm(model_dir)
    p = 0.2
    apply_dropout(lm, p)
    down = lm.model.layers[1].mlp.down_proj
    seen = {}
    # registered after apply_dropout's hook, so it sees the dropped output
    down.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], out=out))
    lm.train()
    with torch.no_grad():
        lm(input_ids=torch.randint(FIRST_ID, lm.config.vocab_size, (4, 50)))
    raw = torch.nn.functional.linear(seen["x"], down.weight)
    kept = seen["out"] != 0
    fraction_dropped = 1 - kept.double().mean().item()
    # 4*50*32 = 6400 draws: the std of the dropped fraction is 0.005
    assert abs(fraction_dropped - p) < 0.03
    torch.testing.assert_close(seen["out"][kept], raw[kept] / (1 - p))


def test_dropout_zero_adds_no_hooks(model_dir):
    lm = _lm(model_dir)
    assert apply_dropout(lm, 0.0)["branch_hooks"] == 0 and _branch_hooks(lm) == 0


def test_dropout_on_gpt2_sets_config_fields():
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64)
    model = GPT2LMHeadModel(config)
    applied = apply_dropout(model, 0.3)
    assert applied["branch_hooks"] == 0 and _branch_hooks(model) == 0
    assert {"resid_pdrop", "attn_pdrop", "embd_pdrop"} <= set(applied["config_fields"])
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.3
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) >= 1 + 2 * 2 and all(m.p == 0.3 for m in dropouts)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(input_ids=ids).logits, model(input_ids=ids).logits)
        model.eval()
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_dropout_fields_written_as_integer_zero_are_set():
    # config.json files often say "resid_pdrop": 0 (an int); those fields must still be found
    config = GPT2Config(
        n_embd=16,
        n_layer=1,
        n_head=2,
        vocab_size=11,
        n_positions=8,
        resid_pdrop=0,
        attn_pdrop=0,
        embd_pdrop=0,
    )
    applied = apply_dropout(GPT2LMHeadModel(config), 0.1)
    assert {"resid_pdrop", "attn_pdrop", "embd_pdrop"} <= set(applied["config_fields"])
    assert config.resid_pdrop == 0.1
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=11,
            attention_dropout=0,
        )
    )
    applied = apply_dropout(llama, 0.1)
    assert applied == {"config_fields": ["attention_dropout"], "branch_hooks": 2}
    assert llama.model.layers[0].self_attn.attention_dropout == 0.1


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rejects_bad_rates(p):
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=11, n_positions=8))
    with pytest.raises(ValueError, match="dropout"):
        apply_dropout(model, p)
    with pytest.raises(ValueError, match="dropout"):
        ModelOptions(dropout=p)


def test_load_with_dropout_option_and_lora_hooks_the_adapted_projections(model_dir):
    lm = _lm(model_dir, lora_r=4, dropout=0.2)
    hooked = [
        (name, module)
        for name, module in lm.named_modules()
        if name.rsplit(".", 1)[-1] in BRANCH_OUTPUT_NAMES and module._forward_hooks
    ]
    assert len(hooked) == 2 * LAYERS
    # the hook sits on peft's wrapper (base layer + adapter delta), not on the base layer inside it
    assert all(hasattr(module, "base_layer") for _, module in hooked)
    assert lm.training


# ---- ModelOptions and loading ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "bf16"}, "dtype"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
        ({"quantization": "2bit", "lora_r": 4}, "quantization"),
        ({"lora_r": -1}, "lora_r"),
        ({"quantization": "4bit"}, "LoRA"),
        ({"quantization": "8bit", "lora_r": 0}, "LoRA"),
    ],
)
def test_model_options_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelOptions(**kwargs)


def test_quantization_without_cuda_is_a_clear_error(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    options = ModelOptions(quantization="4bit", lora_r=4)  # valid as options
    with pytest.raises(ValueError, match="CUDA"):
        load_causal_lm(model_dir, options)


def test_resolve_dtype_and_attention_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("eager") == "eager"


def test_load_applies_dtype_and_attention(model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = _lm(model_dir, dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert lm.config._attn_implementation == "eager" and lm.training
    lm = _lm(model_dir)
    assert {p.dtype for p in lm.parameters()} == {torch.float32}
    assert lm.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="flash_attention_2"):
        _lm(model_dir, dtype="float32", attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="config.json"):
        load_causal_lm(os.path.dirname(model_dir))


@pytest.mark.parametrize("lora_r", [0, 4])
def test_gradient_checkpointing_gives_the_same_gradients(model_dir, lora_r):
    sequences = _sequences(1024, [9, 5], [3, 2])
    batch = pad_batch(sequences, pad_token_id=0)
    grads, seed = [], int(torch.randint(0, 2**31, ()))
    for checkpointing in (False, True):
        torch.manual_seed(seed)  # the same LoRA init both times
        lm = _lm(model_dir, lora_r=lora_r, gradient_checkpointing=checkpointing)
        assert lm.training and lm.is_gradient_checkpointing == checkpointing
        CausalLMPolicy(lm)(batch["targets"], **model_inputs(batch)).sum().backward()
        grads.append({n: p.grad for n, p in lm.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert all(g is not None for g in checkpointed.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_load_tokenizer_falls_back_to_eos_as_pad(model_dir, tmp_path):
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((Path(model_dir) / "config.json").read_text())
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token_id == reloaded.eos_token_id == 2


# ---- LoRA ----------------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_lowers_the_loss(model_dir):
    base = _lm(model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lm = _lm(model_dir, lora_r=4, lora_alpha=8.0)
    trainable = [name for name, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("lm_head" in name or "embed_tokens" in name for name in trainable)
    assert loading.trainable_parameters(lm)[0] == sum(p.numel() for p in lm.parameters() if p.requires_grad)

    policy = CausalLMPolicy(lm)
    sequences = _sequences(lm.config.vocab_size, [10, 7, 12], [4, 2, 5])
    batch = pad_batch(sequences, pad_token_id=0)
    inputs = model_inputs(batch)
    with torch.no_grad():
        # B starts at zero: the adapted model starts as the base model
        base.eval()
        torch.testing.assert_close(
            policy(batch["targets"], **inputs), CausalLMPolicy(base)(batch["targets"], **inputs)
        )
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = -policy(batch["targets"], **inputs).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = -policy(batch["targets"], **inputs).mean().item()
    assert final < losses[0] - 0.05, losses + [final]
    # the base weights did not move; only the adapters did
    unwrapped = lm.get_base_model()
    for name, tensor in unwrapped.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, base_state[key]), name


# ---- RewardModel ---------------------------------------------------------------------------------------


def _trunk_reference(trunk_dir, rm: RewardModel, sequences) -> torch.Tensor:
    """Scores from a plain AutoModel in float64, each sequence alone, read at its last token."""
    trunk = AutoModel.from_pretrained(trunk_dir, dtype=torch.float64).eval()
    w = rm.head.proj.weight.detach().double()[0]
    b = rm.head.proj.bias.detach().double()[0] + rm.normalization_bias.double()
    with torch.no_grad():
        return torch.stack(
            [trunk(input_ids=torch.tensor([s.input_ids])).last_hidden_state[0, -1] @ w + b for s in sequences]
        )


def test_reward_model_from_causal_lm_has_a_fresh_head(model_dir):
    rm = RewardModel.from_pretrained(model_dir)
    assert not is_reward_model(model_dir)
    assert torch.equal(rm.head.proj.bias, torch.zeros(1)) and rm.normalization_bias.item() == 0.0
    assert rm.head.proj.weight.shape == (1, 32) and rm.head.proj.weight.abs().sum() > 0
    assert not hasattr(rm.trunk, "lm_head") and rm.training


def test_reward_model_scores_at_the_last_real_token(model_dir):
    rm = RewardModel.from_pretrained(model_dir).eval()
    rm.set_normalization_bias(-0.4)
    sequences = _sequences(rm.config.vocab_size, [5, 12, 1, 8], [2, 4, 1, 3])
    expected = _trunk_reference(model_dir, rm, sequences)
    with torch.no_grad():
        for side in ("right", "left"):
            batch = pad_batch(sequences, pad_token_id=0, padding_side=side)
            scores = rm(**model_inputs(batch))
            assert scores.shape == (4,) and scores.dtype == torch.float32
            torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)
            # only the mask matters: a batch without position_ids gives the same scores
            plain = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if side == "right":
                torch.testing.assert_close(plain.double(), expected, atol=1e-5, rtol=1e-5)
        packed = pack_batch(sequences)
        last_index = packed["cu_seq_lens"][1:].long() - 1
        torch.testing.assert_close(
            rm(last_index=last_index, **model_inputs(packed)).double(), expected, atol=1e-5, rtol=1e-5
        )
        single = rm(input_ids=torch.tensor([sequences[1].input_ids]))  # no mask at all
        torch.testing.assert_close(single.double(), expected[1:2], atol=1e-5, rtol=1e-5)


def test_reward_model_round_trip(model_dir, tmp_path):
    rm = RewardModel.from_pretrained(model_dir)
    with torch.no_grad():
        rm.head.proj.bias.fill_(0.125)
    rm.set_normalization_bias(0.7315)
    out = tmp_path / "rm"
    rm.save_pretrained(out)
    assert is_reward_model(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["fastrlhf_reward"]["normalization_bias"] == pytest.approx(0.7315)
    assert config["fastrlhf_reward"]["score_offset"] == pytest.approx(0.7315 + 0.125)

    reloaded = RewardModel.from_pretrained(str(out))
    # the two constants come back as one: the whole offset in the normalisation bias
    assert reloaded.normalization_bias.item() == pytest.approx(0.7315 + 0.125)
    assert reloaded.head.proj.bias.item() == 0.0
    assert torch.equal(reloaded.head.proj.weight, rm.head.proj.weight)
    sequences = _sequences(rm.config.vocab_size, [6, 11, 3], [2, 5, 1])
    batch = pad_batch(sequences, pad_token_id=0)
    rm.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**model_inputs(batch)), rm(**model_inputs(batch)), atol=1e-6, rtol=0
        )
    # the trunk loads as an ordinary HF base model
    trunk = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        ids = batch["input_ids"][:1]
        assert torch.equal(trunk(input_ids=ids).last_hidden_state, rm.trunk(input_ids=ids).last_hidden_state)


def test_reward_model_head_shape_mismatch_names_the_file(model_dir, tmp_path):
    rm = RewardModel.from_pretrained(model_dir)
    out = tmp_path / "rm"
    rm.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    tensors["score.weight"] = torch.zeros(1, 33)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"rm: head weight has shape \(1, 33\)"):
        RewardModel.from_pretrained(str(out))


def test_reward_model_with_lora_saves_merged_weights(model_dir, tmp_path):
    rm = RewardModel.from_pretrained(model_dir, ModelOptions(lora_r=4))
    lora_b = [p for name, p in rm.trunk.named_parameters() if "lora_B" in name]
    assert lora_b
    with torch.no_grad():
        for p in lora_b:  # B starts at zero; make the adapters change the model
            p.normal_(0, 0.3)
    rm.set_normalization_bias(-1.25)
    rm.eval()
    sequences = _sequences(rm.config.vocab_size, [7, 4, 10], [3, 1, 4])
    batch = pad_batch(sequences, pad_token_id=0)
    with torch.no_grad():
        adapted = rm(**model_inputs(batch))
        base = RewardModel(AutoModel.from_pretrained(model_dir), copy.deepcopy(rm.head), -1.25).eval()
        assert not torch.allclose(adapted, base(**model_inputs(batch)), atol=1e-3)
    out = tmp_path / "rm"
    rm.save_pretrained(out)
    assert not (out / "adapter_config.json").exists()
    # saving merged a copy: the in-memory model still has its adapters and its scores
    assert any("lora_" in name for name, _ in rm.trunk.named_parameters())
    with torch.no_grad():
        assert torch.equal(rm(**model_inputs(batch)), adapted)
    reloaded = RewardModel.from_pretrained(str(out)).eval()
    assert not any("lora_" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluating_switches_dropout_off_and_gives_the_mode_back_even_when_the_block_raises(was_training):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5)).train(was_training)
    x = torch.randn(4, 6)
    with evaluating(module):
        assert not module.training and not module[1].training
        assert not torch.is_grad_enabled()
        torch.testing.assert_close(module(x), module[0](x))  # no dropout in the block
    assert module.training is was_training and module[1].training is was_training
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="inside the block"), evaluating(module):
        raise RuntimeError("inside the block")
    assert module.training is was_training and torch.is_grad_enabled()


@pytest.fixture
def cuda_with_bf16(monkeypatch):
    """What ``dtype="auto"`` sees on a bf16-capable GPU machine; the models still load on the CPU."""
    import peft  # noqa: F401  (imported first: its bitsandbytes import would believe the patch below)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def test_auto_dtype_on_a_gpu_trains_full_weights_in_fp32(cuda_with_bf16, monkeypatch):
    """bf16 weights round away an AdamW step below half their spacing (2^-9 to 2^-8 of a weight): frozen
    models and LoRA bases load in bf16, a model whose full weights train in fp32; an explicit dtype is
    kept."""
    assert resolve_dtype("auto") == torch.bfloat16
    assert resolve_dtype("auto", trains_full_weights=True) == torch.float32
    assert resolve_dtype("bfloat16", trains_full_weights=True) == torch.bfloat16
    assert loading.weights_dtype(ModelOptions(), trains=True) == torch.float32
    assert loading.weights_dtype(ModelOptions(), trains=False) == torch.bfloat16
    assert loading.weights_dtype(ModelOptions(lora_r=4), trains=True) == torch.bfloat16  # a frozen base
    assert loading.weights_dtype(ModelOptions(dtype="float16"), trains=True) == torch.float16
    # flash-attn needs half-precision weights: auto keeps sdpa for fp32 ones.
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object())
    assert resolve_attention("auto", torch.float32) == "sdpa"
    assert resolve_attention("auto", torch.bfloat16) == "flash_attention_2"
    assert loading.dtype_name(torch.bfloat16) == "bfloat16" and loading.dtype_name(torch.float32) == "float32"


def test_ppo_models_on_a_gpu_train_in_fp32_next_to_a_reference_of_the_same_dtype(model_dir, cuda_with_bf16):
    from fastrlhf.models.actor_critic import build_actor_critic

    def dtypes(module, trainable=None):
        return {p.dtype for p in module.parameters() if trainable is None or p.requires_grad == trainable}

    separate = build_actor_critic("separate", model_dir, None, ModelOptions())
    # The reference matches the policy, so their KL is 0 before the first update.
    assert dtypes(separate.policy_lm) == dtypes(separate.reference_lm) == {torch.float32}
    assert dtypes(separate.critic) == {torch.float32}
    lora = build_actor_critic("lora", model_dir, None, ModelOptions(lora_r=4))
    assert dtypes(lora.policy_lm, trainable=False) == {torch.bfloat16}  # the frozen base
    assert dtypes(lora.policy_lm, trainable=True) == {torch.float32}  # peft keeps adapters in fp32
    reward_model = RewardModel.from_pretrained(model_dir, ModelOptions())  # scoring only: frozen
    assert dtypes(reward_model.trunk) == {torch.bfloat16}
    critic = RewardModel.from_pretrained(model_dir, ModelOptions(), trains=True)
    assert dtypes(critic.trunk) == {torch.float32}
