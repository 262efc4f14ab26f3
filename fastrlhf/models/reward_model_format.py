"""Reward models on disk: transformers' sequence-classification format, written and read, and the older
fastrlhf format, read.

**Written** (``fastrlhf rm``): an ``AutoModelForSequenceClassification`` directory with one label, the
format of TRL's ``RewardTrainer``, OpenRLHF and the public reward models. transformers' class scores a
sequence as ``score.weight · h`` at its last token that is not ``config.pad_token_id``; it has no bias.
fastrlhf's score adds a constant (its head's bias plus the normalisation bias that makes demonstrations
score 0). Where that constant goes:

- **Trunks whose final norm has a bias** (LayerNorm: GPT-2, GPT-NeoX): the constant is folded into that
  bias along the head's direction, ``β += c · w / |w|²``, so transformers' class gives fastrlhf's scores
  exactly (checked on a probe batch before writing; a fold that does not check out is not written).
- **Trunks without one** (RMSNorm: Llama, Qwen2, Mistral, Gemma): no parameter of transformers' class
  can add a constant. It is stored in ``config.json`` (``fastrlhf_reward.score_offset``); fastrlhf adds
  it back, and transformers' class gives fastrlhf's score minus that offset. Rankings, pairwise
  preferences and whitened PPO rewards are unchanged by it.

The pooled token is ``config.pad_token_id``'s business, so it must be an id no real sequence contains.
A tokenizer whose pad is its eos (GPT-2's, Llama 3's, with fastrlhf's eos-as-pad fallback) would make
transformers score every eos-terminated response at the token before its eos; the directory then gets
its own pad token (``<|reward_pad|>``), with an embedding row added when the vocabulary has none spare.

**Read**: the format above (foreign models included: their offset is 0), and the older fastrlhf
format: a trunk directory plus ``score_head.safetensors`` (head weight, head bias, normalisation bias).
That older format is still what an architecture without any sequence classifier (custom code that ships
none) is written in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from fastrlhf.errors import InputError
from fastrlhf.models.eval_mode import evaluating

LEGACY_HEAD_FILE = "score_head.safetensors"  # the older format's head (weight, bias, normalisation bias)
CONFIG_KEY = "fastrlhf_reward"  # config.json entry: {"normalization_bias", "score_offset", "folded_into"}
SCORE_WEIGHT = "score.weight"  # every causal *ForSequenceClassification in transformers names its head so
REWARD_PAD_TOKEN = "<|reward_pad|>"
NOT_A_REWARD_MODEL = (
    "is not a reward model: expected a directory written by `fastrlhf rm` or an "
    "AutoModelForSequenceClassification with one label (num_labels=1)"
)


@dataclass
class ScoreHead:
    """A reward model's head as read from disk: ``score = weight[1, H] · h + offset``."""

    weight: torch.Tensor
    offset: float
    normalization_bias: float


# ---- reading ------------------------------------------------------------------------------------------


def _config_json(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{config_path}: cannot read the model config: {e}") from e


def is_sequence_classification(path: str) -> bool:
    """True when ``path``'s config names a ``*ForSequenceClassification`` architecture."""
    architectures = _config_json(path).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def is_reward_model(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a reward model in either format (a bare causal LM is not one)."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, LEGACY_HEAD_FILE)):
        return True
    return os.path.isfile(os.path.join(path, "config.json")) and is_sequence_classification(path)


def _label_count(config: dict) -> int:
    if "id2label" in config:
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default when neither is written


def _read_checkpoint_tensor(path: str, key: str) -> torch.Tensor:
    """One tensor of a saved HF model, from a single or sharded safetensors or PyTorch checkpoint."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = os.path.join(path, index_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map", {})
            if key not in weight_map:
                raise InputError(f"{index_path}: no {key!r} in the weight map; is this a reward model?")
            file = os.path.join(path, weight_map[key])
        else:
            file = os.path.join(path, single_name)
            if not os.path.exists(file):
                continue
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as f:
                if key not in f.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
                    raise InputError(f"{file}: no {key!r} tensor; is this a reward model?")
                return f.get_tensor(key)
        state = torch.load(file, map_location="cpu", weights_only=True)
        if key not in state:
            raise InputError(f"{file}: no {key!r} tensor; is this a reward model?")
        return state[key]
    raise InputError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def read_score_head(path: str, hidden_size: int | None = None) -> ScoreHead | None:
    """The saved head of the reward model at ``path`` (either format), or None for a bare causal LM.

    Raises ``InputError`` for a classifier with more than one label, or a head whose width is not
    ``hidden_size`` (when given)."""
    legacy = os.path.join(path, LEGACY_HEAD_FILE)
    if os.path.exists(legacy):
        from safetensors.torch import load_file

        tensors = load_file(legacy)
        weight, normalization_bias = tensors["weight"], float(tensors["normalization_bias"].reshape(()))
        offset = float(tensors["bias"].reshape(())) + normalization_bias
        source = legacy
    elif is_sequence_classification(path):
        config = _config_json(path)
        labels = _label_count(config)
        if labels != 1:
            raise InputError(
                f"{os.path.join(path, 'config.json')}: a sequence classifier with {labels} labels; a reward "
                "model has one (num_labels=1)"
            )
        weight = _read_checkpoint_tensor(path, SCORE_WEIGHT)
        ours = config.get(CONFIG_KEY) or {}
        offset = float(ours.get("score_offset", 0.0))
        normalization_bias = float(ours.get("normalization_bias", 0.0))
        source = path
    else:
        return None
    weight = weight.float().reshape(1, -1) if weight.dim() == 1 else weight.float()
    if weight.shape[0] != 1 or (hidden_size is not None and weight.shape[1] != hidden_size):
        raise InputError(
            f"{source}: head weight has shape {tuple(weight.shape)}, the trunk needs (1, {hidden_size})"
        )
    return ScoreHead(weight, offset, normalization_bias)


# ---- writing ------------------------------------------------------------------------------------------


def _final_norm_with_bias(trunk: nn.Module) -> tuple[str, nn.Module] | None:
    """The trunk's final norm when it has an additive bias of width H (a direct child named like a norm)."""
    hidden_size = trunk.config.hidden_size
    found = [
        (name, module)
        for name, module in trunk.named_children()
        if "norm" in type(module).__name__.lower()
        and isinstance(getattr(module, "bias", None), torch.Tensor)
        and tuple(module.bias.shape) == (hidden_size,)
    ]
    return found[0] if len(found) == 1 else None


def reward_tokenizer(tokenizer):
    """``(tokenizer, pad_id)``: ``tokenizer`` itself when its pad is a token of its own, else a copy with
    ``<|reward_pad|>`` added as pad (see the module docstring)."""
    pad = tokenizer.pad_token_id
    if pad is not None and pad != tokenizer.eos_token_id:
        return tokenizer, pad
    tokenizer = copy.deepcopy(tokenizer)
    name, n = REWARD_PAD_TOKEN, 0
    while name in tokenizer.get_vocab():  # an ordinary token of that spelling is not ours to take
        n += 1
        name = f"<|reward_pad_{n}|>"
    tokenizer.add_special_tokens({"pad_token": name})
    return tokenizer, tokenizer.pad_token_id


@contextlib.contextmanager
def _embedding_row_for(trunk: nn.Module, token_id: int):
    """Temporarily give ``trunk``'s input embedding a row for ``token_id`` (the mean row) if it lacks one."""
    embedding = trunk.get_input_embeddings()
    rows = embedding.weight.shape[0]
    if token_id < rows:
        yield
        return
    vocab_size = trunk.config.vocab_size
    grown = nn.Embedding(token_id + 1, embedding.weight.shape[1], dtype=embedding.weight.dtype)
    with torch.no_grad():
        grown.weight[:rows] = embedding.weight
        grown.weight[rows:] = embedding.weight.mean(dim=0)
    grown.padding_idx = embedding.padding_idx
    trunk.set_input_embeddings(grown)
    trunk.config.vocab_size = token_id + 1
    try:
        yield
    finally:
        trunk.set_input_embeddings(embedding)
        trunk.config.vocab_size = vocab_size


def has_sequence_classifier(config) -> bool:
    """Whether transformers (or the model's own code, already trusted to load it) has a sequence
    classifier for ``config``'s architecture."""
    from transformers import AutoModelForSequenceClassification

    if "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {}):
        return True
    return type(config) in AutoModelForSequenceClassification._model_mapping


def _sequence_classifier(trunk: nn.Module, weight: torch.Tensor, config):
    """transformers' ``AutoModelForSequenceClassification`` for ``config`` around ``trunk`` (not copied)."""
    from transformers import AutoModelForSequenceClassification

    # A model with its own code was loaded with --trust-remote-code: its classifier is that same code.
    remote = bool(getattr(config, "auto_map", None))
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=remote)
    setattr(model, model.base_model_prefix, trunk)
    model.score = nn.Linear(weight.shape[1], 1, bias=False)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model.eval()


def _probe_scores(model, trunk: nn.Module, weight: torch.Tensor, offset: float, pad_id: int):
    """fastrlhf's scores and transformers' on a fixed right-padded probe batch ``[2, 6]`` (float64)."""
    generator = torch.Generator().manual_seed(0)
    high = min(trunk.get_input_embeddings().weight.shape[0], 1000)
    ids = torch.randint(0, high, (2, 6), generator=generator)
    ids[ids == pad_id] = (pad_id + 1) % high
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = pad_id, 0
    device = next(trunk.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        hidden = trunk(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(2, device=device), torch.tensor([5, 3], device=device)]
        ours = last.double() @ weight.double().to(device)[0] + offset
        theirs = model(input_ids=ids, attention_mask=mask).logits.double()[:, 0]
    return ours, theirs


def write_sequence_classification(
    directory: str | os.PathLike,
    trunk: nn.Module,
    weight: torch.Tensor,
    offset: float,
    normalization_bias: float,
    tokenizer=None,
) -> None:
    """Save ``trunk`` (a plain HF base model, no adapters) with the head ``weight[1, H]`` and the score's
    constant ``offset`` as an ``AutoModelForSequenceClassification`` directory (see the module docstring),
    with ``tokenizer`` (its pad made distinct from eos). ``trunk`` is left as it was.

    Without a tokenizer, ``trunk.config.pad_token_id`` is used as is."""
    if tokenizer is not None:
        tokenizer, pad_id = reward_tokenizer(tokenizer)
    else:
        pad_id = trunk.config.pad_token_id
    weight = weight.detach().float().cpu()
    norm = _final_norm_with_bias(trunk)
    # A fold needs an fp32 bias to add a small vector exactly enough, and a head that is not all zero.
    foldable = norm is not None and norm[1].bias.dtype in (torch.float32, torch.float64)
    foldable = foldable and float(weight.double().square().sum()) > 0.0 and offset != 0.0
    probe_pad = pad_id if pad_id is not None else 0
    # the probe compares deterministic forwards: no dropout
    with evaluating(trunk), _embedding_row_for(trunk, probe_pad):
        config = copy.deepcopy(trunk.config)
        config.num_labels = 1
        config.pad_token_id = pad_id
        config.architectures = None  # save_pretrained writes the classifier's own name
        folded_into, stored_offset = None, offset
        original_bias = norm[1].bias.detach().clone() if foldable else None
        try:
            model = _sequence_classifier(trunk, weight, config)
            if foldable:
                expected = _probe_scores(model, trunk, weight, offset, probe_pad)[0]
                direction = weight.double()[0] / weight.double().square().sum()
                with torch.no_grad():
                    norm[1].bias.add_((offset * direction).to(norm[1].bias))
                folded = _probe_scores(model, trunk, weight, 0.0, probe_pad)[1]
                if float((folded - expected).abs().max()) <= 1e-5 * (1.0 + float(expected.abs().max())):
                    folded_into, stored_offset = norm[0], 0.0
                else:  # not the last thing the trunk applies: keep the offset in the config instead
                    with torch.no_grad():
                        norm[1].bias.copy_(original_bias)
            setattr(
                model.config,
                CONFIG_KEY,
                {
                    "normalization_bias": float(normalization_bias),
                    "score_offset": float(stored_offset),
                    "folded_into": folded_into,
                },
            )
            model.save_pretrained(directory)
        finally:
            if original_bias is not None:
                with torch.no_grad():
                    norm[1].bias.copy_(original_bias)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_legacy(
    directory: str | os.PathLike,
    trunk: nn.Module,
    weight: torch.Tensor,
    offset: float,
    normalization_bias: float,
    tokenizer=None,
) -> None:
    """The older format, for architectures without a sequence classifier: ``trunk``'s directory plus
    ``score_head.safetensors`` (weight ``[1, H]``, bias, normalisation bias)."""
    from safetensors.torch import save_file

    trunk.save_pretrained(directory)
    tensors = {
        "weight": weight.detach().float().cpu().contiguous(),
        "bias": torch.tensor([offset - normalization_bias], dtype=torch.float32),
        "normalization_bias": torch.tensor([normalization_bias], dtype=torch.float32),
    }
    save_file(
        tensors, os.path.join(directory, LEGACY_HEAD_FILE), metadata={"format": "fastrlhf-reward-model"}
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
