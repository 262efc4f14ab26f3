"""Step 1 of InstructGPT: supervised fine-tuning on prompt -> demonstration.

The loss is the mean negative log-likelihood of the response tokens only. It comes from
``fastrlhf.ops.linear_logprobs`` on the final hidden states of the response positions, so neither the
prompt nor the padding ever reaches the unembedding and no ``[tokens, vocab]`` logits are held.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate.utils import send_to_device

from fastrlhf.data.batching import choose_packing, make_collator, model_inputs
from fastrlhf.data.tokenize import tokenize_sft
from fastrlhf.errors import InputError
from fastrlhf.models.eval_mode import evaluating
from fastrlhf.models.loading import (
    load_causal_lm,
    load_config,
    resolve_attention,
    trainable_parameters,
    weights_dtype,
)
from fastrlhf.models.policy import CausalLMPolicy, require_plain_logits
from fastrlhf.train.arguments import TrainArguments, flag
from fastrlhf.train.datasets import load_tokenized, local_eval_loader, make_loader, split_texts
from fastrlhf.train.run import TrainingRun
from fastrlhf.train.unwrap import unwrap_model


@dataclasses.dataclass
class SFTConfig(TrainArguments):
    data: str = flag(
        "sample", 'SFT JSONL ({"prompt", "response"}, or chat {"messages"}); \'sample\' = bundled.'
    )
    eval_data: str | None = flag(None, "Held-out SFT JSONL; default: a user-disjoint split of --data.")
    data_format: str = flag("sft", 'sft ({"prompt", "response"}) or chat ({"messages": [...]}).')
    epochs: int = flag(8, "Passes over the training data (InstructGPT: 16).")
    ptx_data: str | None = flag(
        None,
        'Pretraining text JSONL ({"text"}) trained on next to the demonstrations as plain language '
        "modelling, so the policy keeps (or, for tiny, gets) the text distribution whose perplexity PPO's "
        "alignment tax is measured on; every 10th line is held out, as in `fastrlhf ppo`.",
    )
    learning_rate: float = flag(2e-3, "Peak learning rate (the default suits the tiny model).")

    def __post_init__(self):
        super().__post_init__()
        if self.data_format not in ("sft", "chat"):
            raise InputError(f"data_format: expected sft or chat, got {self.data_format!r}")


def train_sft(config: SFTConfig) -> dict:
    """Fine-tune ``config.model`` on ``config.data``; returns the summary (also in summary.json)."""
    # All inputs are read and checked before the run directory is touched.
    require_plain_logits(load_config(config.model, config.trust_remote_code), config.model)
    data = load_tokenized(config, tokenize_sft)
    tokenizer, train_seqs, eval_seqs, train_report = data.tokenizer, data.train, data.eval, data.report
    text_seqs, _ = split_texts(config.ptx_data, config.ptx_data, tokenizer) if config.ptx_data else ([], [])
    train_seqs = train_seqs + text_seqs
    run = TrainingRun(config)
    accelerator = run.accelerator

    lm = load_causal_lm(config.model, config, device_index=accelerator.local_process_index, trains=True)
    policy = CausalLMPolicy(lm)
    attention = resolve_attention(config.attn_implementation, weights_dtype(config, trains=True))
    packing = choose_packing(attention, config.packing)
    collate = make_collator(tokenizer.pad_token_id, packing=packing)
    lengths = [len(s.input_ids) for s in train_seqs]
    train_loader, train_sampler, padding = make_loader(
        train_seqs,
        lengths,
        config.batch_size,
        collate,
        shuffle=True,
        group_by_length=config.group_by_length,
        seed=config.seed,
    )
    eval_loader = local_eval_loader(
        eval_seqs, lambda s: len(s.input_ids), config.batch_size, collate, accelerator
    )
    policy, optimizer, scheduler, train_loader, total_steps = run.prepare(policy, train_loader)

    def loss_fn(batch: dict):
        """Mean NLL of the micro-batch's response tokens."""
        logprobs = policy(batch["targets"], **model_inputs(batch))
        return -logprobs.mean(), {"items": logprobs.numel()}

    def evaluate() -> dict:
        """Held-out mean NLL per response token, over all processes."""
        if not eval_seqs:
            return {}
        total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        model = unwrap_model(accelerator, policy)
        with evaluating(model):
            for batch in eval_loader:
                batch = send_to_device(batch, run.device)
                logprobs = model(batch["targets"], **model_inputs(batch))
                total -= logprobs.double().sum().cpu()
                count += logprobs.numel()
        loss = run.reduce_mean(total, count)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    step, first_eval, last_eval = run.fit(
        policy,
        optimizer,
        scheduler,
        train_loader,
        train_sampler,
        loss_fn,
        evaluate,
        total_steps,
        bar={"loss": "train/loss", "held-out loss": "eval/loss", "tokens/s": "train/items_per_s"},
        desc="sft",
    )
    model_dir = run.save_model(policy, tokenizer)
    trainable, total = trainable_parameters(unwrap_model(accelerator, policy))
    summary = {
        "task": "sft",
        "model_dir": str(model_dir),
        "steps": step,
        "epochs": config.epochs,
        "eval_loss_start": first_eval.get("eval/loss"),
        "eval_loss_end": last_eval.get("eval/loss"),
        "train_examples": len(train_seqs) - len(text_seqs),
        "pretraining_texts": len(text_seqs),
        "eval_examples": len(eval_seqs),
        "tokenization": train_report.as_dict(),
        "packing": packing,
        "padding_fraction": padding,
        "optimizer": type(optimizer.optimizer).__name__,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return run.finish(
        summary,
        {
            "loss": ["train/loss", "eval/loss"],
            "lr": ["lr"],
            "grad_norm": ["train/grad_norm"],
            "throughput": ["train/items_per_s"],
        },
    )
