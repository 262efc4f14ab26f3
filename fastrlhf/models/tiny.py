"""The embedded ``tiny`` model: a ~1M-parameter Llama and a byte-level BPE tokenizer, built locally.

``tiny`` lets every trainer, test and example run with no hub access and learn the bundled sample data
in minutes on a CPU. The tokenizer is committed under ``fastrlhf/models/tiny_tokenizer/`` (rebuild it
with ``build_tiny_tokenizer``); the weights are not committed: ``resolve_model("tiny")`` initialises
them from a fixed seed into ``$FASTRLHF_HOME/tiny-v2`` on first use.

Chat format (one line, no newlines; every assistant turn ends with eos)::

    <|bos|><|user|>What is 3 plus 4?<|assistant|>3 plus 4 is 7.<|eos|>
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading

from fastrlhf.errors import InputError

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")
TINY_NAME = "tiny"
TINY_CACHE_DIR = "tiny-v2"  # bump when the tokenizer or the default config changes
DEFAULT_HOME = os.path.join("~", ".cache", "fastrlhf")

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Order fixes the ids: pad 0, bos 1, eos 2, system 3, user 4, assistant 5.
SPECIAL_TOKENS = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT)
VOCAB_SIZE = 1024  # every word of the sample data fits in one or two tokens at this size
MAX_LENGTH = 512
# Seeded init runs on torch's global RNG: two threads building at once would interleave their draws.
_INIT_LOCK = threading.Lock()

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{%- elif message['role'] == 'system' -%}" + SYSTEM + "{{ message['content'] }}"
    "{%- else -%}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)

# A little generic English next to the sample data, so that text outside the synthetic world (user
# prompts in examples, model generations) still gets common-word merges instead of single bytes.
GENERIC_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question in one short sentence.",
    "Thank you for your help, that was very useful.",
    "Can you tell me what time it is now?",
    "I think the answer is correct, but let me check again.",
    "Write a short story about a small robot who wants to learn.",
    "The model reads the prompt and then writes a response.",
    "We train the policy with a reward model and a penalty to stay close to the reference.",
    "People like clear, honest and helpful answers.",
    "This is a test of the tokenizer with some numbers: 1, 2, 3, 10, 100 and 2024.",
    "Where is the nearest train station? It is next to the old market.",
    "She said hello, and he said goodbye.",
)

# Sized to learn the sample data in minutes on 2 CPU cores: ~1M parameters, 4 layers of width 128.
DEFAULT_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=352,
    max_position_embeddings=MAX_LENGTH,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    attention_dropout=0.0,
)


def _corpus() -> list[str]:
    """Every text of the default data of every synthetic task (the bundled sample data among them), plus
    the generic English."""
    from fastrlhf.data.tasks import TASKS, task_module

    texts = list(GENERIC_ENGLISH)
    for name in TASKS:
        world = task_module(name)
        sizes = world.SAMPLE_SIZES
        for line in world.sft_examples(sizes["sft"]):
            texts += [line["prompt"], line["response"]]
        for line in world.ranked_examples(sizes["rm"]):
            texts += [line["prompt"]] + [response["text"] for response in line["responses"]]
        texts += [line["prompt"] for line in world.prompts(sizes["ppo"])]
        texts += [line["text"] for line in world.pretraining_texts(sizes["ptx"])]
    return texts


def build_tiny_tokenizer(out_dir: str | os.PathLike):
    """Train the byte-level BPE tokenizer on the sample data and save it (HF format) into ``out_dir``.
    Returns the ``PreTrainedTokenizerFast``. Byte-level: any UTF-8 text round-trips through
    encode/decode. Encoding adds bos (as Llama's tokenizers do); the chat template writes its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,  # a merge seen once is noise
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[SYSTEM, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,  # would turn "7 ." into "7." and break the round trip
        model_max_length=MAX_LENGTH,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(os.fspath(out_dir))
    return wrapped


def load_tiny_tokenizer():
    """The committed tokenizer, as a ``PreTrainedTokenizerFast``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_config(**overrides):
    """The ``LlamaConfig`` of ``tiny`` (``DEFAULT_CONFIG`` updated with ``overrides``), with the vocabulary
    and special ids of the committed tokenizer."""
    from transformers import LlamaConfig

    tokenizer = load_tiny_tokenizer()
    values = dict(
        DEFAULT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def build_tiny_model(
    out_dir: str | os.PathLike, seed: int = 0, architecture: str = "llama", **overrides
) -> str:
    """Initialise ``tiny`` (``tiny_config(**overrides)``) from ``seed`` and save it with its tokenizer as an
    HF directory at ``out_dir``; returns the directory. The global torch RNG is left as it was.
    ``architecture`` other than ``llama`` builds that architecture at tiny's sizes instead
    (``architectures.architecture_config(architecture, **overrides)``).

    The directory appears atomically (built next to it, then renamed), so a crash never leaves half a
    model. A model already at ``out_dir`` is kept as it is. Concurrent builders (the processes of one
    ``accelerate launch`` starting on a fresh cache) take turns under an advisory file lock next to the
    directory: the first builds, the others find its model. Delete the directory to rebuild."""
    import fcntl

    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    if _is_model_dir(out_dir):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    lock_path = os.path.join(parent, f".{os.path.basename(out_dir)}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_model_dir(out_dir):  # another process built it while this one waited
            return out_dir
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            raise FileExistsError(
                f"out_dir {out_dir!r} exists, is not empty and holds no model (no config.json)"
            )
        _build_into(out_dir, parent, seed, architecture, overrides)
        # Safe to remove while held: a process still waiting on it finds the model once it gets the lock,
        # and one arriving later finds the model before it looks for a lock.
        os.unlink(lock_path)
    return out_dir


def _build_into(out_dir: str, parent: str, seed: int, architecture: str, overrides: dict) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from fastrlhf.models.architectures import architecture_config

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        if architecture == "llama":
            config = tiny_config(**overrides)
        else:
            config = architecture_config(architecture, **overrides)
        with _INIT_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(tmp)
        load_tiny_tokenizer().save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)  # replaces an empty directory; fails on a non-empty one
        except OSError:
            if not _is_model_dir(out_dir):
                raise
            # Another builder renamed its copy in first: keep that one.
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fastrlhf_home() -> str:
    """Where fastrlhf caches what it builds: ``$FASTRLHF_HOME``, else ``~/.cache/fastrlhf``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("FASTRLHF_HOME") or DEFAULT_HOME))


RUN_MODEL_DIR = "model"  # where a training run writes its final model (fastrlhf.train.run)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """The local directory to load a model from. ``"tiny"`` is built into ``$FASTRLHF_HOME/tiny-v2`` on
    first use; a fastrlhf run directory stands for its final model (``<run>/model``); anything else must be
    an existing directory with a ``config.json``. Raises ``ValueError`` otherwise: fastrlhf never
    downloads from the hub."""
    if os.fspath(name_or_path) == TINY_NAME:
        return build_tiny_model(os.path.join(fastrlhf_home(), TINY_CACHE_DIR))
    path = os.path.abspath(os.path.expanduser(os.fspath(name_or_path)))
    if not _is_model_dir(path) and _is_model_dir(os.path.join(path, RUN_MODEL_DIR)):
        path = os.path.join(path, RUN_MODEL_DIR)
    if not _is_model_dir(path):
        raise InputError(
            f"model {os.fspath(name_or_path)!r}: not a local directory with config.json; fastrlhf loads "
            f"models from local paths or {TINY_NAME!r} (no hub downloads)"
        )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny tokenizer or model.")
    sub = parser.add_subparsers(dest="what", required=True)
    tok = sub.add_parser("tokenizer", help="retrain the tokenizer (default: the committed directory)")
    tok.add_argument("out_dir", nargs="?", default=TOKENIZER_DIR)
    model = sub.add_parser("model", help="initialise the model into a directory")
    model.add_argument("out_dir")
    model.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "tokenizer":
        build_tiny_tokenizer(args.out_dir)
        print(args.out_dir)
    else:
        print(build_tiny_model(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
