"""Loading a local causal LM and its tokenizer the way every trainer wants it.

- dtype: bf16 on a CUDA device that supports it, fp32 on CPU (``--dtype`` overrides).
- attention: ``flash_attention_2`` when flash-attn imports on CUDA, ``sdpa`` otherwise.
- options: gradient checkpointing, LoRA through peft, an 8/4-bit frozen base through bitsandbytes (CUDA
  only), and a dropout override.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os

import torch

from fastrlhf.errors import InputError
from fastrlhf.models.dropout import apply_dropout
from fastrlhf.models.tiny import resolve_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATION = ("none", "8bit", "4bit")


# The adapters' rank when `--actor-critic lora` is asked for without --lora-r: the rank common in LoRA
# RLHF recipes (TRL's and OpenRLHF's examples use 8-64); alpha stays 16, so the scale alpha/r is 1.
DEFAULT_LORA_RANK = 16

TRUST_REMOTE_CODE_HELP = (
    "Run the Python code a model directory ships (config.json's auto_map) to load it; off by default, "
    "as that code runs with your permissions."
)


@dataclasses.dataclass
class ModelOptions:
    """How to load and adapt the model; the trainers' configs inherit these flags."""

    dtype: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (fp32 on CPU; on CUDA fp32 for a model whose full weights train, "
            "bf16 for frozen models and LoRA bases), float32, bfloat16 or float16."
        },
    )
    attn_implementation: str = dataclasses.field(
        default="auto",
        metadata={
            "help": "auto (flash_attention_2 when flash-attn imports on CUDA, else sdpa), sdpa, eager, "
            "or flash_attention_2."
        },
    )
    gradient_checkpointing: bool = dataclasses.field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    lora_r: int = dataclasses.field(
        default=0,
        metadata={
            "help": "LoRA rank; 0 trains all weights, > 0 trains only LoRA adapters (peft). "
            f"ppo --actor-critic lora without a rank uses {DEFAULT_LORA_RANK}."
        },
    )
    lora_alpha: float = dataclasses.field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = dataclasses.field(
        default="all-linear",
        metadata={"help": "Modules that get adapters: 'all-linear' or a comma-separated list of names."},
    )
    quantization: str = dataclasses.field(
        default="none",
        metadata={
            "help": "Frozen base in 8bit or 4bit through bitsandbytes (CUDA only; needs --lora-r > 0), "
            "or none."
        },
    )
    trust_remote_code: bool = dataclasses.field(default=False, metadata={"help": TRUST_REMOTE_CODE_HELP})
    dropout: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Override residual and attention dropout (InstructGPT's SFT used 0.2); "
            "unset keeps the model config's."
        },
    )

    def __post_init__(self):
        if self.dtype not in ("auto", *DTYPES):
            raise InputError(f"dtype: expected auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attn_implementation not in ATTENTION:
            raise InputError(
                f"attn_implementation: expected one of {ATTENTION}, got {self.attn_implementation!r}"
            )
        if self.quantization not in QUANTIZATION:
            raise InputError(f"quantization: expected one of {QUANTIZATION}, got {self.quantization!r}")
        if self.lora_r < 0:
            raise InputError(f"lora_r must be >= 0, got {self.lora_r}")
        if self.quantization != "none" and self.lora_r == 0:
            raise InputError(
                "quantization: a quantized base is frozen, so it needs LoRA adapters (--lora-r > 0)"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")


def resolve_dtype(name: str, trains_full_weights: bool = False) -> torch.dtype:
    """``auto`` -> fp32 on CPU. On a CUDA device with bf16 support: bf16 for a frozen model (a reward model
    that scores, a LoRA base, a model that only generates), fp32 for one whose full weights train
    (``trains_full_weights``). An optimizer step smaller than half a weight's bf16 spacing (2^-9 to 2^-8 of
    its magnitude) rounds away: AdamW at PPO's 1e-4 left a bf16 tiny policy nearly where it started (clip
    fraction 0, a tenth of fp32's KL to the reference, half its gold-score gain; measured on CPU)."""
    if name != "auto":
        return DTYPES[name]
    if not trains_full_weights and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The ``--dtype`` value of a torch dtype: ``float32``, ``bfloat16`` or ``float16``."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def resolve_attention(name: str, dtype: torch.dtype | None = None) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is importable, CUDA is present and the weights are
    half precision (``dtype``; None: not known, taken as half), else sdpa."""
    if name != "auto":
        return name
    half = dtype is None or dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def require_trust_for_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse, with the flag to pass, a model directory whose config or tokenizer maps to its own code."""
    if trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json"):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            auto_map = json.load(f).get("auto_map")
        if auto_map:
            files = sorted(
                {str(v[0] if isinstance(v, list) else v).split(".")[0] + ".py" for v in auto_map.values()}
            )
            raise InputError(
                f"{file}: the model ships its own code ({', '.join(files)}, named in auto_map) and loading "
                "it runs that code; pass --trust-remote-code true if you trust it"
            )


def load_config(model: str, trust_remote_code: bool = False):
    """The transformers config of a local model directory (or ``tiny``), without loading weights."""
    from transformers import AutoConfig

    path = resolve_model(model)
    require_trust_for_remote_code(path, trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer of a local model directory (or ``tiny``), with a pad token guaranteed.

    A tokenizer without a pad token gets its eos as pad: the trainers never read pad positions (masks
    and -100 targets exclude them), so sharing the id is safe.
    """
    from transformers import AutoTokenizer

    path = resolve_model(model)
    require_trust_for_remote_code(path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(f"model {model!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(options: ModelOptions, dtype: torch.dtype):
    if options.quantization == "none":
        return None
    if not torch.cuda.is_available():
        raise InputError(
            f"quantization={options.quantization!r}: bitsandbytes 8/4-bit weights need a CUDA device"
        )
    from transformers import BitsAndBytesConfig

    if options.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _supports_sdpa(path: str, auto_class) -> bool:
    """Whether the class ``auto_class`` maps ``path``'s config to runs under sdpa (True when unknown)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
        model_class = auto_class._model_mapping[type(config)]
    except (KeyError, ValueError, OSError):  # remote code, or an unmapped config: let transformers decide
        return True
    return bool(getattr(model_class, "_supports_sdpa", True))


def weights_dtype(options: ModelOptions, trains: bool) -> torch.dtype:
    """The dtype a model loads in: a trained model's full weights train unless LoRA adapters or a
    quantized base carry the training (then the base is frozen; peft keeps the adapters in fp32)."""
    full_weights = trains and options.lora_r == 0 and options.quantization == "none"
    return resolve_dtype(options.dtype, trains_full_weights=full_weights)


def load_causal_lm(
    model: str,
    options: ModelOptions | None = None,
    *,
    auto_class=None,
    device_index: int = 0,
    trains: bool = False,
):
    """Load ``model`` (a local HF directory or ``tiny``) with ``options`` applied.

    ``auto_class`` defaults to ``AutoModelForCausalLM``; the reward model passes ``AutoModel`` to get the
    trunk without the unembedding. ``trains``: the model is trained, which decides ``dtype="auto"``
    (``weights_dtype``). Returns the model in train mode (LoRA-wrapped when ``lora_r > 0``).
    """
    from transformers import AutoModelForCausalLM

    options = options or ModelOptions()
    auto_class = auto_class or AutoModelForCausalLM
    path = resolve_model(model)
    dtype = weights_dtype(options, trains)
    attention = resolve_attention(options.attn_implementation, dtype)
    if attention == "flash_attention_2" and dtype == torch.float32:
        raise InputError("attn_implementation=flash_attention_2 needs --dtype bfloat16 or float16")
    require_trust_for_remote_code(path, options.trust_remote_code)
    if options.attn_implementation == "auto" and attention == "sdpa" and not _supports_sdpa(path, auto_class):
        attention = "eager"  # e.g. Gemma 2: sdpa cannot soft-cap attention scores
    kwargs = {
        "dtype": dtype,
        "attn_implementation": attention,
        "trust_remote_code": options.trust_remote_code,
    }
    quantization = _quantization_config(options, dtype)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device_index})
    lm = auto_class.from_pretrained(path, **kwargs)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=options.gradient_checkpointing)
    elif options.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.lora_r > 0:
        lm = add_lora(lm, options)
    if options.dropout is not None:
        applied = apply_dropout(lm, options.dropout)
        log.info("dropout %.3g applied: %s", options.dropout, applied)
    lm.train()
    return lm


def add_lora(lm, options: ModelOptions, adapter_name: str = "default"):
    """Wrap ``lm`` with peft LoRA adapters named ``adapter_name``; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    from fastrlhf.models.actor_critic import lora_kwargs

    return get_peft_model(lm, LoraConfig(**lora_kwargs(options)), adapter_name=adapter_name)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a parameter partitioned by ZeRO-3 counts whole."""

    def count(parameter) -> int:
        return getattr(parameter, "ds_numel", None) or parameter.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return trainable, total
