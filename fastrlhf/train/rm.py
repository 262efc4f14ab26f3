"""Step 2 of InstructGPT: a reward model from K ranked responses per prompt.

One batch element is one prompt: its K responses go through the model (as one flat batch of
sequences), each gets a scalar at its last token, and ``fastrlhf.ops.ranking_loss`` takes the mean of
``-log sigma(r_w - r_l)`` over all C(K,2) pairs of that prompt. Keeping a prompt's pairs together is the
paper's fix for the overfitting that comes from treating each pair as an independent example.

After training the normalisation bias is set so that demonstrations score 0 on average.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate.utils import send_to_device

from fastrlhf import ops
from fastrlhf.data.batching import choose_packing, make_collator, model_inputs
from fastrlhf.data.bundled import data_path
from fastrlhf.data.readers import read_jsonl
from fastrlhf.data.tokenize import tokenize_ranked
from fastrlhf.errors import InputError
from fastrlhf.inference.score import score_pairs
from fastrlhf.models.eval_mode import evaluating
from fastrlhf.models.loading import resolve_attention, trainable_parameters, weights_dtype
from fastrlhf.models.reward_model import RewardModel
from fastrlhf.train.arguments import TrainArguments, flag
from fastrlhf.train.datasets import load_tokenized, local_eval_loader, make_loader
from fastrlhf.train.guards import NonFiniteError
from fastrlhf.train.run import TrainingRun
from fastrlhf.train.unwrap import unwrap_model


@dataclasses.dataclass
class RMConfig(TrainArguments):
    data: str = flag(
        "sample", 'Ranked JSONL ({"prompt", "responses": [{"text", "ranking"}]}); \'sample\' = bundled.'
    )
    eval_data: str | None = flag(None, "Held-out ranked JSONL; default: a user-disjoint split of --data.")
    data_format: str = flag("rm", 'rm (K ranked responses) or pairs ({"prompt", "chosen", "rejected"}).')
    sft_data: str | None = flag(
        None,
        "Demonstrations whose mean score becomes 0 after training (the bias); "
        "default: the rank-1 responses of --data.",
    )
    batch_size: int = flag(8, "Prompts per micro-batch on each process (each brings its K responses).")
    epochs: int = flag(1, "Passes over the rankings (InstructGPT: 1; more overfits).")
    learning_rate: float = flag(1e-3, "Peak learning rate (the default suits the tiny model).")
    margin: float = flag(0.0, "Margin subtracted from each pair's reward gap in the ranking loss.")

    def __post_init__(self):
        super().__post_init__()
        if self.data_format not in ("rm", "pairs"):
            raise InputError(f"data_format: expected rm or pairs, got {self.data_format!r}")


def make_group_collator(pad_token_id: int, packing: bool):
    """Collate prompts with K responses each into one flat batch of sequences plus ``ranks[B, Kmax]``.

    Returns a callable on a list of ``TokenizedGroup`` giving the sequence batch (see ``make_collator``)
    with ``slot[S]`` (each sequence's flat index into ``[B * Kmax]``), ``ranks[B, Kmax]`` and
    ``mask[B, Kmax]`` added.
    """
    collate_sequences = make_collator(pad_token_id, packing=packing)

    def collate(groups):
        k_max = max(len(g.sequences) for g in groups)
        batch = collate_sequences([seq for g in groups for seq in g.sequences])
        ranks = torch.ones(len(groups), k_max, dtype=torch.long)
        mask = torch.zeros(len(groups), k_max, dtype=torch.bool)
        slots = []
        for i, group in enumerate(groups):
            k = len(group.sequences)
            ranks[i, :k] = torch.tensor(group.rankings)
            mask[i, :k] = True
            slots.extend(i * k_max + j for j in range(k))
        batch.update(slot=torch.tensor(slots), ranks=ranks, mask=mask)
        return batch

    return collate


def group_length(group) -> int:
    """A prompt's cost is its longest response (they are padded together): its length for grouping."""
    return max(len(s.input_ids) for s in group.sequences)


def score_batch(reward_model, batch: dict) -> torch.Tensor:
    """Scores ``[S]`` of the sequences of a collated batch (padded or packed)."""
    last_index = batch["cu_seq_lens"][1:].long() - 1 if "cu_seq_lens" in batch else None
    return reward_model(last_index=last_index, **model_inputs(batch))


def group_rewards(scores: torch.Tensor, batch: dict) -> torch.Tensor:
    """Scatter the flat ``scores[S]`` into ``rewards[B, Kmax]`` (0 where a prompt has fewer responses)."""
    ranks = batch["ranks"]
    flat = scores.new_zeros(ranks.numel()).index_copy(0, batch["slot"].to(scores.device), scores)
    return flat.view_as(ranks.float())


def train_rm(config: RMConfig) -> dict:
    """Train a reward model from ``config.model`` (normally the SFT model); returns the summary."""
    # All inputs are read and checked before the run directory is touched.
    data = load_tokenized(config, tokenize_ranked)
    tokenizer, truncation, train_records = data.tokenizer, data.truncation, data.train_records
    train_groups, eval_groups, train_report = data.train, data.eval, data.report
    demonstrations = bias_reference_records(config, train_records)
    run = TrainingRun(config)
    accelerator = run.accelerator

    reward_model = RewardModel.from_pretrained(
        config.model, config, device_index=accelerator.local_process_index, trains=True
    )
    attention = resolve_attention(config.attn_implementation, weights_dtype(config, trains=True))
    packing = choose_packing(attention, config.packing)
    collate = make_group_collator(tokenizer.pad_token_id, packing)
    lengths = [group_length(g) for g in train_groups]
    train_loader, train_sampler, padding = make_loader(
        train_groups,
        lengths,
        config.batch_size,
        collate,
        shuffle=True,
        group_by_length=config.group_by_length,
        seed=config.seed,
    )
    eval_loader = local_eval_loader(eval_groups, group_length, config.batch_size, collate, accelerator)
    reward_model, optimizer, scheduler, train_loader, total_steps = run.prepare(reward_model, train_loader)

    def ranking(model, batch: dict):
        scores = score_batch(model, batch)
        return ops.ranking_loss(
            group_rewards(scores, batch), batch["ranks"], batch["mask"], margin=config.margin
        )

    def loss_fn(batch: dict):
        result = ranking(reward_model, batch)
        return result.loss, {"accuracy": result.accuracy.detach(), "items": batch["ranks"].shape[0]}

    def evaluate() -> dict:
        """Held-out ranking loss and pairwise accuracy, each prompt weighted equally."""
        if not eval_groups:
            return {}
        loss_sum, acc_sum, prompts = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        model = unwrap_model(accelerator, reward_model)
        with evaluating(model):
            for batch in eval_loader:
                result = ranking(model, send_to_device(batch, run.device))
                counted = batch["ranks"].shape[0] - int(result.num_prompts_without_pairs)
                loss_sum += float(result.loss) * counted
                acc_sum += float(result.accuracy) * counted
                prompts += counted
        return {
            "eval/loss": run.reduce_mean(loss_sum, prompts),
            "eval/accuracy": run.reduce_mean(acc_sum, prompts),
        }

    step, first_eval, last_eval = run.fit(
        reward_model,
        optimizer,
        scheduler,
        train_loader,
        train_sampler,
        loss_fn,
        evaluate,
        total_steps,
        bar={"loss": "train/loss", "accuracy": "train/accuracy", "held-out accuracy": "eval/accuracy"},
        desc="rm",
    )

    # Normalise: demonstrations score 0 on average (InstructGPT), so a later PPO reward of 0 means
    # "as good as a demonstration".
    unwrapped = unwrap_model(accelerator, reward_model)
    # Every process scores all demonstrations, so all end with the same bias without communication.
    unwrapped.set_normalization_bias(0.0)
    scores = score_pairs(unwrapped, tokenizer, demonstrations, truncation, config.batch_size)
    if not scores:
        raise InputError("sft_data: no demonstrations to set the reward normalisation bias from")
    bias = -sum(scores) / len(scores)
    if not math.isfinite(bias):
        bad = sum(not math.isfinite(x) for x in scores)
        raise NonFiniteError(
            f"the reward model scores {bad} of {len(scores)} demonstrations as NaN/inf, so its "
            "normalisation bias is not finite; the model is not saved (lower --learning-rate)"
        )
    unwrapped.set_normalization_bias(bias)
    model_dir = run.save_model(
        reward_model, tokenizer, save_fn=lambda model, path: model.save_pretrained(path, tokenizer)
    )
    trainable, total = trainable_parameters(unwrapped)
    summary = {
        "task": "rm",
        "model_dir": str(model_dir),
        "steps": step,
        "epochs": config.epochs,
        "eval_accuracy_start": first_eval.get("eval/accuracy"),
        "eval_accuracy_end": last_eval.get("eval/accuracy"),
        "eval_loss_end": last_eval.get("eval/loss"),
        "normalization_bias": bias,
        "normalization_reference": config.sft_data or "rank-1 responses of --data",
        "normalization_examples": len(demonstrations),
        "train_prompts": len(train_groups),
        "eval_prompts": len(eval_groups),
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
            "accuracy": ["train/accuracy", "eval/accuracy"],
            "lr": ["lr"],
            "grad_norm": ["train/grad_norm"],
        },
    )


def bias_reference_records(config: RMConfig, train_records) -> list:
    """Demonstrations for the bias: ``--sft-data``, or the rank-1 response of each training prompt."""
    from fastrlhf.data.records import SFTExample

    if config.sft_data:
        return read_jsonl(data_path(config.sft_data, "sft", "sft_data"), "sft")
    return [SFTExample(r.prompt, r.best, r.user, r.source) for r in train_records]
