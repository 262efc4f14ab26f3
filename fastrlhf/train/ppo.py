"""Step 3 of InstructGPT: PPO against the reward model, with a per-token KL penalty to the SFT policy,
GAE, and optional PPO-ptx.

Each step:
1. **Rollout.** Sample a response to a batch of prompts with the policy (eval mode, KV cache), cut at the
   first EOS; score it with the reward model (its normalisation bias applied) and/or a rule reward.
2. **Experience.** Old and reference log-probs from the hidden states (``ops.linear_logprobs``: no
   ``[tokens, vocab]`` logits kept), values from the critic, then ``ops.compute_advantages``: the
   KL-shaped token rewards ``-β·KL`` plus the score at the last token, GAE, whitened advantages, returns.
3. **Update.** ``--ppo-epochs`` passes over the rollout in minibatches: ``ops.linear_ppo_policy_loss``
   (fused clipped surrogate) + ``vf_coef`` x ``ops.value_loss``; with ``--ptx-data``, ``γ`` x the LM loss on
   pretraining text joins the same gradient buffers before the one optimizer step (PPO-ptx).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import time

import torch
from accelerate.utils import send_to_device

from fastrlhf import ops
from fastrlhf.data.batching import model_inputs, pad_batch
from fastrlhf.data.bundled import data_path
from fastrlhf.data.hygiene import split_by_user
from fastrlhf.data.readers import read_jsonl
from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompts, tokenize_texts
from fastrlhf.models.actor_critic import MODES, POLICY_ADAPTER, build_actor_critic
from fastrlhf.models.loading import ModelOptions, load_tokenizer
from fastrlhf.models.reward_model import RewardModel, is_reward_model
from fastrlhf.models.tiny import resolve_model
from fastrlhf.train.arguments import RunArguments, flag
from fastrlhf.train.kl_control import KLController
from fastrlhf.train.optim import build_optimizer, param_groups
from fastrlhf.train.rewards import call_reward_fn, load_reward_fn
from fastrlhf.train.rollout import (
    backward_micro_batch,
    collect_rollout,
    compute_experience,
    micro_batches,
    select_rows,
    text_perplexity,
)
from fastrlhf.train.run import TrainingRun, peak_memory_mib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PPOConfig(RunArguments):
    policy: str = flag(
        "tiny", "The SFT model to start from (a local HF directory, an SFT run dir, or 'tiny')."
    )
    reward_model: str | None = flag(
        None, "The reward model (`fastrlhf rm` output); 'none' with --reward-fn only."
    )
    prompts: str = flag(
        "sample", "PPO prompt JSONL ({\"prompt\"}, extra fields ignored); 'sample' = bundled."
    )
    eval_prompts: str | None = flag(
        None, "Held-out prompts for the start/end comparison; default: a user split."
    )
    validation_fraction: float = flag(
        0.1, "Held-out fraction of --prompts (by user) when --eval-prompts is unset."
    )
    ptx_data: str | None = flag(None, "Pretraining text JSONL ({\"text\"}) for PPO-ptx; 'sample' = bundled.")
    ptx_coef: float = flag(27.8, "γ: weight of the pretraining LM loss in PPO-ptx (InstructGPT: 27.8).")
    ptx_batch_size: int = flag(4, "Pretraining sequences per micro-batch.")
    eval_text: str = flag("sample", "Text JSONL whose held-out lines measure the LM perplexity before/after.")
    actor_critic: str = flag(
        "separate", "Memory mode: separate (own critic), shared (one trunk), lora (adapters)."
    )
    steps: int = flag(40, "PPO steps (one rollout and its update each).")
    rollout_batch_size: int = flag(32, "Prompts per rollout on each process.")
    minibatch_size: int = flag(
        16, "Rollout rows per optimizer step (split into --gradient-accumulation-steps)."
    )
    ppo_epochs: int = flag(2, "Passes over each rollout.")
    max_new_tokens: int = flag(24, "Response tokens to sample at most.")
    temperature: float = flag(1.0, "Sampling temperature of the rollout (the log-probs use the same).")
    top_p: float = flag(1.0, "Nucleus sampling mass of the rollout.")
    max_prompt_tokens: int = flag(256, "Longer prompts keep their last tokens.")
    kl_coef: float = flag(0.02, "β of the per-token KL penalty to the SFT policy (InstructGPT: 0.02).")
    target_kl: float | None = flag(
        None, "Adapt β toward this per-sequence KL (Ziegler et al.); unset: fixed β."
    )
    kl_horizon: int = flag(10000, "Horizon of the adaptive KL controller, in samples.")
    kl_estimator: str = flag("k1", "KL estimator of the penalty: k1, k2, k3 or abs.")
    gamma: float = flag(1.0, "GAE discount.")
    lam: float = flag(0.95, "GAE λ.")
    clip_eps: float = flag(0.2, "PPO ratio clip range.")
    value_clip: float = flag(0.2, "Value clip range (0: no clipping).")
    vf_coef: float = flag(0.1, "Weight of the value loss.")
    entropy_coef: float = flag(0.0, "Entropy bonus.")
    score_clip: float = flag(0.0, "Clip scores to [-c, c] before shaping (0: no clipping).")
    whiten_scores: bool = flag(False, "Whiten the rollout's scores before shaping.")
    missing_eos_penalty: float | None = flag(None, "Subtract this from the score of responses without EOS.")
    reward_fn: str | None = flag(None, "A rule reward module:function(prompts, responses) -> list[float].")
    reward_fn_weight: float = flag(1.0, "Weight of --reward-fn when added to the reward model's score.")
    eval_reward_fn: str | None = flag(
        None,
        "A ground-truth module:function scoring the held-out responses at start and end (never trained "
        "on), e.g. fastrlhf.data.synthetic:gold_reward for the bundled data; it exposes reward hacking.",
    )
    ema_decay: float = flag(0.0, "EMA of the policy weights saved as the final model (paper: 0.992; 0: off).")
    learning_rate: float = flag(5e-5, "Peak learning rate.")
    eval_max_new_tokens: int = flag(24, "Greedy response tokens in the start/end evaluation.")

    def __post_init__(self):
        super().__post_init__()
        if self.actor_critic not in MODES:
            raise ValueError(f"actor_critic: expected one of {MODES}, got {self.actor_critic!r}")
        for name in (
            "steps",
            "rollout_batch_size",
            "minibatch_size",
            "ppo_epochs",
            "max_new_tokens",
            "ptx_batch_size",
            "max_prompt_tokens",
            "eval_max_new_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.reward_model in (None, "none") and not self.reward_fn:
            raise ValueError("reward_model: give a reward model, or --reward-model none with --reward-fn")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
            raise ValueError(f"kl_estimator: expected k1, k2, k3 or abs, got {self.kl_estimator!r}")

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps


def load_frozen_reward_model(config: PPOConfig, device) -> RewardModel | None:
    if config.reward_model in (None, "none"):
        return None
    path = resolve_model(config.reward_model)
    if not is_reward_model(path):
        raise ValueError(f"reward_model: {config.reward_model} is not a reward model saved by `fastrlhf rm`")
    reward_model = RewardModel.from_pretrained(
        path, ModelOptions(dtype=config.dtype, attn_implementation=config.attn_implementation)
    )
    reward_model.eval().requires_grad_(False)
    return reward_model.to(device)


def split_prompts(config: PPOConfig):
    records = read_jsonl(data_path(config.prompts, "ppo", "prompts"), "ppo")
    if config.eval_prompts:
        return records, read_jsonl(data_path(config.eval_prompts, "ppo", "eval_prompts"), "ppo")
    train, held_out = split_by_user(records, config.validation_fraction, config.seed)
    if not train:
        raise ValueError(f"prompts: the held-out split took every prompt of {config.prompts}")
    return train, held_out


def split_texts(config: PPOConfig, tokenizer, max_tokens: int = 128):
    """(ptx training sequences, held-out perplexity sequences): every 10th line of the eval text is
    held out, and when the ptx data is the same file those lines are removed from it."""
    eval_path = data_path(config.eval_text, "ptx", "eval_text")
    eval_records = read_jsonl(eval_path, "ptx")
    held_out = eval_records[::10]
    ptx_records = []
    if config.ptx_data:
        ptx_path = data_path(config.ptx_data, "ptx", "ptx_data")
        ptx_records = read_jsonl(ptx_path, "ptx")
        if ptx_path.resolve() == eval_path.resolve():
            held = {r.source for r in held_out}
            ptx_records = [r for r in ptx_records if r.source not in held]
    ptx, _ = tokenize_texts(ptx_records, tokenizer, max_tokens) if ptx_records else ([], None)
    evaluation, _ = tokenize_texts(held_out, tokenizer, max_tokens)
    return ptx, evaluation


def prompt_order(n: int, step: int, batch: int, process: int, processes: int, seed: int) -> list[int]:
    """The prompt indices of ``step`` for ``process``: passes over a per-pass shuffled order, so a resumed
    run draws exactly the prompts the uninterrupted one would have."""
    start = (step * processes + process) * batch
    indices = []
    for position in range(start, start + batch):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


def train_ppo(config: PPOConfig) -> dict:
    """Run PPO; returns the summary (also in summary.json)."""
    run = TrainingRun(config)
    accelerator, device = run.accelerator, run.device
    policy_path = resolve_model(config.policy)
    tokenizer = load_tokenizer(policy_path)
    truncation = TruncationPolicy(config.max_prompt_tokens, 1)

    train_prompts, eval_prompts = split_prompts(config)
    train_ids, _ = tokenize_prompts(train_prompts, tokenizer, truncation)
    eval_ids, _ = tokenize_prompts(eval_prompts, tokenizer, truncation)
    ptx_sequences, perplexity_sequences = split_texts(config, tokenizer)
    reward_fn = load_reward_fn(config.reward_fn) if config.reward_fn else None
    eval_reward_fn = load_reward_fn(config.eval_reward_fn) if config.eval_reward_fn else None
    reward_model = load_frozen_reward_model(config, device)
    rm_path = resolve_model(config.reward_model) if reward_model is not None else None

    model = build_actor_critic(
        config.actor_critic, policy_path, rm_path, config, device_index=accelerator.local_process_index
    )
    memory = model.memory_report()
    if reward_model is not None:
        memory["reward_model"] = sum(p.numel() * p.element_size() for p in reward_model.parameters())
    optimizer = build_optimizer(
        param_groups(model, config.weight_decay),
        config.optimizer,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    steps_per_rollout = config.ppo_epochs * math.ceil(config.rollout_batch_size / config.minibatch_size)
    scheduler = run.scheduler(optimizer, config.steps * steps_per_rollout)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    if reference := unwrapped.reference_lm:
        reference.to(device)
    ema = None
    if config.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(unwrapped.policy_lm, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
        accelerator.register_for_checkpointing(ema)
    kl = KLController(config.kl_coef, config.target_kl, config.kl_horizon)

    def evaluate() -> dict:
        """Greedy responses to the held-out prompts, scored; perplexity of the held-out text."""
        if not eval_ids:
            return {"scores": [], "score": math.nan, "perplexity": math.nan}
        rollout = collect_rollout(
            unwrapped.generation_model(),
            reward_model,
            reward_fn,
            tokenizer,
            [s.input_ids for s in eval_ids],
            [p.prompt for p in eval_prompts],
            max_new_tokens=config.eval_max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            batch_size=config.rollout_batch_size,
            reward_fn_weight=config.reward_fn_weight,
            device=device,
        )
        scores = rollout.scores.tolist()
        gold = call_reward_fn(eval_reward_fn, rollout.prompts, rollout.responses) if eval_reward_fn else []
        perplexity = (
            text_perplexity(
                unwrapped, perplexity_sequences, tokenizer.pad_token_id, config.rollout_batch_size, device
            )
            if perplexity_sequences
            else math.nan
        )
        return {
            "scores": scores,
            "score": sum(scores) / len(scores),
            "perplexity": perplexity,
            "gold": sum(gold) / len(gold) if gold else None,
            "samples": [
                {"prompt": p, "response": r}
                for p, r in zip(rollout.prompts[:4], rollout.responses[:4], strict=False)
            ],
        }

    state = run.restore()
    step = state.get("step", 0)
    kl.value = state.get("kl_coef", kl.value)
    start_eval = state.get("start_eval") or evaluate()
    if not state:
        run.log(
            0,
            {
                "eval/score": start_eval["score"],
                "eval/perplexity": start_eval["perplexity"],
                **({"eval/gold": start_eval["gold"]} if start_eval.get("gold") is not None else {}),
            },
        )
    run.start_progress(config.steps, step, f"ppo[{config.actor_critic}]")
    ptx_stream = (
        _ptx_batches(ptx_sequences, config, tokenizer.pad_token_id, device) if ptx_sequences else None
    )
    if ptx_stream is not None:
        for _ in range(step * steps_per_rollout * config.gradient_accumulation_steps):
            next(ptx_stream)  # a resumed run continues the ptx stream where it stopped
    saved_at = step

    while step < config.steps:
        indices = prompt_order(
            len(train_ids),
            step,
            config.rollout_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            config.seed,
        )
        rollout = collect_rollout(
            unwrapped.generation_model(),
            reward_model,
            reward_fn,
            tokenizer,
            [train_ids[i].input_ids for i in indices],
            [train_prompts[i].prompt for i in indices],
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            batch_size=config.rollout_batch_size,
            reward_fn_weight=config.reward_fn_weight,
            missing_eos_penalty=config.missing_eos_penalty,
            device=device,
        )
        update_start = time.perf_counter()
        experience, advantages = make_experience(unwrapped, rollout, config, kl.value)
        sequence_kl = ((experience["old_logprobs"] - experience["ref_logprobs"]) * rollout.mask).sum(1)
        stats, first_epoch_approx_kl, grad_norm = ppo_update(
            model, accelerator, optimizer, scheduler, rollout, experience, advantages, config, ptx_stream, ema
        )
        update_seconds = time.perf_counter() - update_start
        mean_kl = float(sequence_kl.mean())
        kl.update(mean_kl, rollout.mask.shape[0] * accelerator.num_processes)
        step += 1
        run.progress.update(1)

        response_tokens = float(rollout.mask.sum())
        metrics = {
            k: torch.stack([s[k].float() for s in stats]).mean() for k in stats[0] if stats[0][k] is not None
        }
        metrics.update(
            {
                "score/mean": rollout.scores.mean(),
                "kl/ref": mean_kl,
                "kl/coef": kl.value,
                "response/length": rollout.response_lengths.float().mean(),
                "response/ended_with_eos": rollout.ended_with_eos.float().mean(),
                "policy/first_epoch_approx_kl": first_epoch_approx_kl,
                "tokens_per_s/generation": float(rollout.response_lengths.sum())
                / max(rollout.generation_seconds, 1e-9),
                "tokens_per_s/training": response_tokens * config.ppo_epochs / max(update_seconds, 1e-9),
                "memory/peak_mib": peak_memory_mib(device),
                "lr": scheduler.get_last_lr()[0],
            }
        )
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if step % config.log_every == 0 or step == config.steps:
            run.log(step, metrics, bar=("score/mean", "kl/ref", "policy/clip_fraction"))
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            run.checkpoint(step, {"kl_coef": kl.value, "start_eval": start_eval})
            saved_at = step
    del saved_at

    end_eval = evaluate()
    run.log(
        step,
        {
            "eval/score": end_eval["score"],
            "eval/perplexity": end_eval["perplexity"],
            **({"eval/gold": end_eval["gold"]} if end_eval.get("gold") is not None else {}),
        },
    )
    wins = [
        1.0 if b > a else 0.5 if b == a else 0.0
        for a, b in zip(start_eval["scores"], end_eval["scores"], strict=True)
    ]
    final_lm = ema.module if ema is not None else unwrapped.policy_lm
    model_dir = run.save_model(final_lm, tokenizer, save_fn=_save_policy)
    metrics = read_train_metrics(run)
    summary = {
        "task": "ppo",
        "model_dir": str(model_dir),
        "actor_critic": config.actor_critic,
        "steps": step,
        # One rollout's mean is noisy: start and end average the first and last tenth of the steps (1-10).
        "score_start": _window_mean(metrics, "score/mean", first=True),
        "score_end": _window_mean(metrics, "score/mean", first=False),
        "kl_end": _window_mean(metrics, "kl/ref", first=False),
        "eval_score_start": start_eval["score"],
        "eval_score_end": end_eval["score"],
        "eval_win_rate": sum(wins) / len(wins) if wins else None,
        "eval_gold_start": start_eval.get("gold"),
        "eval_gold_end": end_eval.get("gold"),
        "eval_perplexity_start": start_eval["perplexity"],
        "eval_perplexity_end": end_eval["perplexity"],
        "eval_samples_start": start_eval.get("samples"),
        "eval_samples_end": end_eval.get("samples"),
        "ptx": bool(ptx_sequences),
        "ema_decay": config.ema_decay or None,
        "kl_coef_end": kl.value,
        "parameter_bytes": memory,
        "peak_memory_mib": peak_memory_mib(device),
        "optimizer": type(optimizer.optimizer).__name__,
        "train_prompts": len(train_ids),
        "eval_prompts": len(eval_ids),
    }
    groups = {
        "score": ["score/mean", "eval/score"],
        "kl": ["kl/ref"],
        "entropy": ["policy/entropy"],
        "clip_fraction": ["policy/clip_fraction", "value/clip_fraction"],
        "value_loss": ["value/loss"],
        "approx_kl": ["policy/approx_kl"],
        "response_length": ["response/length"],
        "throughput": ["tokens_per_s/generation", "tokens_per_s/training"],
        "memory": ["memory/peak_mib"],
        "ptx": ["ptx/loss"],
        "perplexity": ["eval/perplexity"],
        "lr": ["lr"],
    }
    return run.finish(summary, groups)


def make_experience(model, rollout, config: PPOConfig, kl_coef: float):
    """Old/reference log-probs and values of a rollout, then the KL-shaped rewards, GAE, whitened
    advantages and returns (``ops.compute_advantages``). ``model`` is the unwrapped ``ActorCritic``."""
    experience = compute_experience(model, rollout, config.micro_batch_size)
    scores = rollout.scores
    if config.whiten_scores:
        scores = (scores - scores.mean()) / scores.std().clamp_min(1e-6)
    advantages = ops.compute_advantages(
        scores,
        experience["old_logprobs"],
        experience["ref_logprobs"],
        experience["values"],
        rollout.mask,
        kl_coef=kl_coef,
        estimator=config.kl_estimator,
        gamma=config.gamma,
        lam=config.lam,
        score_clip=config.score_clip or None,
        whiten=True,
    )
    return experience, advantages


def ppo_update(
    model,
    accelerator,
    optimizer,
    scheduler,
    rollout,
    experience,
    advantages,
    config: PPOConfig,
    ptx_stream=None,
    ema=None,
):
    """``--ppo-epochs`` passes over the rollout: per minibatch, the micro-batches' backward passes (with
    PPO-ptx when ``ptx_stream`` is given), clipping, one optimizer (and scheduler, when given) step, and
    the EMA update. Returns ``(per-micro-batch stats, the first micro-batch's approx KL, last grad norm)``.
    """
    stats, first_epoch_approx_kl, grad_norm = [], None, None
    rows = torch.arange(rollout.mask.shape[0], device=rollout.mask.device)
    for epoch in range(config.ppo_epochs):
        # Epoch 0 keeps the experience pass's row blocks, so its ratio is exactly 1; later epochs shuffle.
        order = rows if epoch == 0 else rows[torch.randperm(rows.numel(), device="cpu").to(rows.device)]
        for minibatch in micro_batches(order, config.minibatch_size):
            blocks = micro_batches(minibatch, config.micro_batch_size)
            for index, block in enumerate(blocks):
                micro = select_rows(rollout, block)
                micro.update(
                    old_logprobs=experience["old_logprobs"][block],
                    old_values=experience["values"][block],
                    advantages=advantages.advantages[block],
                    returns=advantages.returns[block],
                )
                ptx = next(ptx_stream) if ptx_stream is not None else None
                stats.append(
                    backward_micro_batch(
                        model,
                        accelerator,
                        micro,
                        ptx,
                        clip_eps=config.clip_eps,
                        value_clip=config.value_clip or None,
                        vf_coef=config.vf_coef,
                        entropy_coef=config.entropy_coef,
                        ptx_coef=config.ptx_coef,
                        sync=index == len(blocks) - 1,
                    )
                )
                if first_epoch_approx_kl is None:
                    first_epoch_approx_kl = float(stats[-1]["policy/approx_kl"])
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model).policy_lm)
    return stats, first_epoch_approx_kl, grad_norm


def _window_mean(metrics: list[dict], key: str, first: bool) -> float | None:
    values = [m[key] for m in metrics if m.get(key) is not None]
    if not values:
        return None
    window = max(1, min(10, len(values) // 10))
    part = values[:window] if first else values[-window:]
    return sum(part) / len(part)


def read_train_metrics(run: TrainingRun) -> list[dict]:
    from fastrlhf.train.metrics import read_metrics

    return [m for m in read_metrics(run.run_dir / "metrics.jsonl") if "score/mean" in m]


def _save_policy(lm, directory) -> None:
    """The policy as a plain HF model: the policy adapter merged in (lora mode), the critic's left out."""
    if hasattr(lm, "merge_and_unload"):
        import copy

        from fastrlhf.models.actor_critic import CRITIC_ADAPTER

        lm = copy.deepcopy(lm)
        if CRITIC_ADAPTER in lm.peft_config:
            lm.delete_adapter(CRITIC_ADAPTER)
        names = [POLICY_ADAPTER] if POLICY_ADAPTER in lm.peft_config else None
        lm = lm.merge_and_unload(adapter_names=names)
    lm.save_pretrained(directory)


def _ptx_batches(sequences, config: PPOConfig, pad_token_id: int, device):
    """An endless stream of pretraining micro-batches, reshuffled each pass (seeded)."""
    for epoch in itertools.count():
        order = list(range(len(sequences)))
        random.Random(config.seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - config.ptx_batch_size + 1, config.ptx_batch_size) or [0]:
            chunk = [sequences[i] for i in order[start : start + config.ptx_batch_size]]
            batch = send_to_device(pad_batch(chunk, pad_token_id), device)
            yield {"inputs": model_inputs(batch), "targets": batch["targets"]}
