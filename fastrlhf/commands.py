"""The non-training subcommands: ``generate``, ``label``, ``score`` and ``data``. Each reads, computes, and
writes its output atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from fastrlhf.errors import InputError
from fastrlhf.models.loading import TRUST_REMOTE_CODE_HELP
from fastrlhf.models.tiny import resolve_model
from fastrlhf.train.arguments import InputOptions, flag
from fastrlhf.train.io import atomic_output, atomic_write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerateConfig(InputOptions):
    model: str = flag(
        "tiny", "A local HF causal LM directory (an SFT/PPO run's model/, or a run dir), or 'tiny'."
    )
    prompts: str = flag("sample", "Prompt JSONL ({\"prompt\"}; extra fields ignored); 'sample' = bundled.")
    output: str | None = flag(None, 'Output JSONL: one {"prompt", "response"} per prompt.')
    max_new_tokens: int = flag(64, "Tokens to sample at most per response.")
    temperature: float = flag(1.0, "Sampling temperature; 0 decodes greedily.")
    top_p: float = flag(1.0, "Nucleus sampling mass.")
    sampler: str = flag(
        "fastrlhf", "fastrlhf (lean decode loop with ops.sample) or hf (transformers' generate)."
    )
    batch_size: int = flag(16, "Prompts per generate call.")
    max_prompt_tokens: int = flag(256, "Longer prompts keep their last tokens.")
    seed: int = flag(0, "Sampling seed.")
    dtype: str = flag("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.")
    trust_remote_code: bool = flag(False, TRUST_REMOTE_CODE_HELP)

    def __post_init__(self):
        if not self.output:
            raise InputError("output: an output JSONL path is required (--output F.jsonl)")


@dataclasses.dataclass
class LabelConfig(InputOptions):
    model: str = flag("tiny", "The policy whose samples are compared (usually the SFT model), or 'tiny'.")
    prompts: str = flag(
        "sample", "Prompt JSONL ({\"prompt\"}; other fields ignored, so RM files do); 'sample' = bundled."
    )
    labeler: str | None = flag(
        None, "module:function(prompts, responses) -> list[float] that ranks the samples (higher is better)."
    )
    output: str | None = flag(
        None, 'Output JSONL in the RM format: {"prompt", "responses": [{"text", "ranking"}]}.'
    )
    samples_per_prompt: int = flag(4, "Responses sampled per prompt (K; at most 9 distinct are kept).")
    temperature: float = flag(1.0, "Sampling temperature.")
    max_new_tokens: int = flag(64, "Tokens to sample at most per response.")
    batch_size: int = flag(64, "Sequences per generate call.")
    max_prompt_tokens: int = flag(256, "Longer prompts keep their last tokens.")
    seed: int = flag(0, "Sampling seed.")
    dtype: str = flag("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.")
    trust_remote_code: bool = flag(False, TRUST_REMOTE_CODE_HELP)

    def __post_init__(self):
        for name in ("labeler", "output"):
            if not getattr(self, name):
                raise InputError(f"{name}: required (--{name})")
        if self.samples_per_prompt < 2:
            raise InputError(f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0 (the samples must differ), got {self.temperature}")


@dataclasses.dataclass
class ScoreConfig(InputOptions):
    reward_model: str | None = flag(
        None,
        "A reward model: `fastrlhf rm` output (its model/ dir or the run dir) or any "
        "AutoModelForSequenceClassification directory with one label.",
    )
    data: str | None = flag(
        None, 'JSONL of {"prompt", "response"} (e.g. generate\'s output); other fields kept.'
    )
    output: str | None = flag(None, 'Output JSONL: each input object with "reward" added.')
    batch_size: int = flag(16, "Sequences per forward pass.")
    max_prompt_tokens: int = flag(256, "Longer prompts keep their last tokens (as in RM training).")
    max_response_tokens: int = flag(256, "Longer responses keep their first tokens.")
    dtype: str = flag("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.")
    trust_remote_code: bool = flag(False, TRUST_REMOTE_CODE_HELP)

    def __post_init__(self):
        for name in ("reward_model", "data", "output"):
            if not getattr(self, name):
                raise InputError(f"{name}: required (--{name.replace('_', '-')})")


@dataclasses.dataclass
class DataConfig(InputOptions):
    data: str | None = flag(None, "Input JSONL.")
    kind: str = flag("sft", "Format of --data: sft, rm, pairs, ppo, ptx or chat.")
    output: str | None = flag(None, "Output directory: train.jsonl, validation.jsonl, report.json.")
    prefix_chars: int = flag(200, "Prompts whose normalised first N characters match are duplicates.")
    max_per_user: int = flag(200, "Keep at most this many examples per user id (InstructGPT: 200).")
    validation_fraction: float = flag(0.1, "Fraction of users whose examples go to validation.")
    seed: int = flag(0, "Seed of the user split.")
    model: str | None = flag(
        None, "With a model (or 'tiny'): also report tokenisation, truncation and padding."
    )
    batch_size: int = flag(16, "Batch size for the padding report.")
    trust_remote_code: bool = flag(False, TRUST_REMOTE_CODE_HELP)
    max_prompt_tokens: int = flag(256, "Truncation policy for the report: prompt keeps its last N tokens.")
    max_response_tokens: int = flag(
        256, "Truncation policy for the report: response keeps its first N tokens."
    )

    def __post_init__(self):
        for name in ("data", "output"):
            if not getattr(self, name):
                raise InputError(f"{name}: required (--{name})")


def run_generate(config: GenerateConfig) -> Path:
    import torch

    from fastrlhf.data.bundled import data_path
    from fastrlhf.data.readers import read_jsonl
    from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompt
    from fastrlhf.inference.generate import generate_responses
    from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
    from fastrlhf.train.run import quiet_libraries

    quiet_libraries()
    model = resolve_model(config.model)
    records = read_jsonl(data_path(config.prompts, "ppo", "prompts"), "ppo")
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    lm = load_causal_lm(model, ModelOptions(dtype=config.dtype, trust_remote_code=config.trust_remote_code))
    if torch.cuda.is_available():
        lm = lm.cuda()
    truncation = TruncationPolicy(config.max_prompt_tokens, 1)
    prompt_ids = [tokenize_prompt(tokenizer, r.prompt, truncation) for r in records]
    responses = generate_responses(
        lm,
        prompt_ids,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.batch_size,
        generator_seed=config.seed,
        sampler=config.sampler,
    )
    with atomic_output(config.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record, response in zip(records, responses, strict=True):
            text = tokenizer.decode(response.response_ids, skip_special_tokens=True)
            f.write(json.dumps({"prompt": record.prompt, "response": text}, ensure_ascii=False) + "\n")
    ended = sum(r.ended_with_eos for r in responses)
    log.info("wrote %d responses to %s (%d ended with EOS)", len(responses), config.output, ended)
    return Path(config.output)


def run_label(config: LabelConfig) -> dict:
    import torch

    from fastrlhf.data.bundled import data_path
    from fastrlhf.data.readers import read_jsonl
    from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompt
    from fastrlhf.inference.label import label_comparisons
    from fastrlhf.models.loading import ModelOptions, load_causal_lm, load_tokenizer
    from fastrlhf.train.rewards import load_reward_fn
    from fastrlhf.train.run import quiet_libraries

    quiet_libraries()
    labeler = load_reward_fn(config.labeler)
    model = resolve_model(config.model)
    records = read_jsonl(data_path(config.prompts, "ppo", "prompts"), "ppo")
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    lm = load_causal_lm(model, ModelOptions(dtype=config.dtype, trust_remote_code=config.trust_remote_code))
    if torch.cuda.is_available():
        lm = lm.cuda()
    truncation = TruncationPolicy(config.max_prompt_tokens, 1)
    torch.manual_seed(config.seed)
    lines, report = label_comparisons(
        lm,
        tokenizer,
        [tokenize_prompt(tokenizer, r.prompt, truncation) for r in records],
        [r.prompt for r in records],
        labeler,
        users=[r.user for r in records],
        samples_per_prompt=config.samples_per_prompt,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
    )
    with atomic_output(config.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    log.info("wrote %d ranked prompts (%d pairs) to %s", report.lines, report.pairs, config.output)
    return {"output": config.output, **dataclasses.asdict(report)}


def run_score(config: ScoreConfig) -> Path:
    import torch

    from fastrlhf.data.readers import read_jsonl
    from fastrlhf.data.tokenize import TruncationPolicy
    from fastrlhf.inference.score import score_pairs
    from fastrlhf.models.loading import ModelOptions, load_tokenizer
    from fastrlhf.models.reward_model import RewardModel, is_reward_model
    from fastrlhf.models.reward_model_format import NOT_A_REWARD_MODEL
    from fastrlhf.train.run import quiet_libraries

    quiet_libraries()
    model = resolve_model(config.reward_model)
    if not is_reward_model(model):
        raise InputError(f"reward_model: {config.reward_model} {NOT_A_REWARD_MODEL}")
    records = read_jsonl(config.data, "sft")
    raw_lines = _raw_objects(config.data)
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    reward_model = RewardModel.from_pretrained(
        model, ModelOptions(dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    )
    if torch.cuda.is_available():
        reward_model = reward_model.cuda()
    truncation = TruncationPolicy(config.max_prompt_tokens, config.max_response_tokens)
    rewards = score_pairs(reward_model, tokenizer, records, truncation, config.batch_size)
    with atomic_output(config.output) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for record, reward in zip(records, rewards, strict=True):
            obj = raw_lines[record.source]
            obj["reward"] = reward
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    log.info(
        "scored %d responses into %s (mean reward %.4f)",
        len(rewards),
        config.output,
        sum(rewards) / max(len(rewards), 1),
    )
    return Path(config.output)


def _raw_objects(path: str) -> dict[str, dict]:
    """``{"file:line": object}`` of a JSONL file already validated by ``read_jsonl``."""
    objects = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                objects[f"{path}:{number}"] = json.loads(line)
    return objects


def run_data(config: DataConfig) -> dict:
    """Hygiene (prefix dedupe, per-user cap, user-disjoint split) and, with --model, a tokenisation report."""
    from fastrlhf.data.batching import LengthGroupedBatchSampler, padding_fraction
    from fastrlhf.data.bundled import data_path
    from fastrlhf.data.hygiene import clean
    from fastrlhf.data.readers import read_jsonl

    path = data_path(config.data, config.kind)
    records = read_jsonl(path, config.kind)
    train, validation, report = clean(
        records, config.prefix_chars, config.max_per_user, config.validation_fraction, config.seed
    )
    raw = _raw_lines(path)
    out = Path(config.output)
    for name, part in (("train.jsonl", train), ("validation.jsonl", validation)):
        with atomic_output(out / name) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(raw[r.source] for r in part)
    result = {"input": str(path), "kind": config.kind, **dataclasses.asdict(report)}
    if config.model:
        from fastrlhf.data.tokenize import TruncationPolicy, tokenize_ranked, tokenize_sft
        from fastrlhf.models.loading import load_tokenizer
        from fastrlhf.train.run import quiet_libraries

        quiet_libraries()
        tokenizer = load_tokenizer(resolve_model(config.model), config.trust_remote_code)
        truncation = TruncationPolicy(config.max_prompt_tokens, config.max_response_tokens)
        if config.kind in ("sft", "chat"):
            sequences, token_report = tokenize_sft(train, tokenizer, truncation)
            lengths = [len(s.input_ids) for s in sequences]
        elif config.kind in ("rm", "pairs"):
            groups, token_report = tokenize_ranked(train, tokenizer, truncation)
            lengths = [max(len(s.input_ids) for s in g.sequences) for g in groups]
        else:
            raise InputError(
                f"model: the tokenisation report covers sft, chat, rm and pairs data, not {config.kind}"
            )
        grouped = list(
            iter(LengthGroupedBatchSampler(lengths, config.batch_size, shuffle=True, seed=config.seed))
        )
        in_order = [
            list(range(i, min(i + config.batch_size, len(lengths))))
            for i in range(0, len(lengths), config.batch_size)
        ]
        result["tokenization"] = token_report.as_dict()
        result["padding_fraction"] = {
            "length_grouped": padding_fraction(lengths, grouped),
            "file_order": padding_fraction(lengths, in_order),
        }
    atomic_write_json(out / "report.json", result)
    return result


def _raw_lines(path: Path) -> dict[str, str]:
    """``{"file:line": the line}`` so that kept records are written back byte for byte."""
    lines = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            lines[f"{path}:{number}"] = line if line.endswith("\n") else line + "\n"
    return lines
