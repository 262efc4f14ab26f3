"""Step 3 of InstructGPT: PPO against the reward model, with a per-token KL penalty to the SFT policy, GAE
and optional PPO-ptx; and the critic-free estimators (GRPO, RLOO, REINFORCE++) on the same loop.

Each step (``train_ppo``):
1. **Rollout** (``rollout.py``): sample ``--samples-per-prompt`` responses to a batch of prompts at
   ``--temperature`` (eval mode, KV cache), cut at the first EOS, score with the reward model and/or a
   rule reward.
2. **Experience** (``experience.py``): old and reference log-probs under the sampled distribution, values,
   the normalised score, and the advantages of ``--advantage-estimator``.
3. **Update** (``update.py``): ``--ppo-epochs`` passes in minibatches of the fused clipped policy loss,
   the value loss, and PPO-ptx.
Then the KL coefficient adapts toward ``--target-kl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import statistics
import time

import torch

from fastrlhf.data.bundled import data_path
from fastrlhf.data.hygiene import split_users_by_share
from fastrlhf.data.readers import read_jsonl
from fastrlhf.data.tokenize import TruncationPolicy, tokenize_prompts
from fastrlhf.errors import InputError
from fastrlhf.inference.generate import SAMPLERS
from fastrlhf.models.actor_critic import MODES, POLICY_ADAPTER, build_actor_critic
from fastrlhf.models.loading import DEFAULT_LORA_RANK, ModelOptions, load_config, load_tokenizer
from fastrlhf.models.policy import decoder_and_head, require_plain_logits
from fastrlhf.models.reward_model import RewardModel, is_reward_model
from fastrlhf.models.reward_model_format import NOT_A_REWARD_MODEL
from fastrlhf.models.tiny import resolve_model
from fastrlhf.train.arguments import RunArguments, flag
from fastrlhf.train.datasets import split_texts
from fastrlhf.train.ema import WeightEMA
from fastrlhf.train.evaluation import EvalSet, compare, evaluate_policy
from fastrlhf.train.experience import (
    ESTIMATORS,
    KL_PLACEMENTS,
    OLD_LOGPROB_SOURCES,
    explained_variance,
    make_experience,
)
from fastrlhf.train.kl_control import KLController
from fastrlhf.train.metrics import global_metrics
from fastrlhf.train.optim import build_optimizer, param_groups
from fastrlhf.train.rewards import NORMALIZATIONS, ScoreNormalizer, call_reward_fn, load_reward_fn
from fastrlhf.train.rollout import collect_rollout
from fastrlhf.train.run import TrainingRun, peak_memory_mib
from fastrlhf.train.sharding import (
    DEFAULT_SHARD_FROZEN_ABOVE_MIB,
    gathered_for_generation,
    reshard_all,
    shard_frozen,
)
from fastrlhf.train.signals import StopOnSignals
from fastrlhf.train.unwrap import unwrap_model
from fastrlhf.train.update import ppo_update, ptx_batches
from fastrlhf.train.zero import (
    refresh_master_weights,
    track_zero3_model,
    whole_model_construction,
    zero3_gathered,
    zero3_modifiable,
)

# The default peak learning rates (docs/alignment.md has the measurements). LoRA adapters start at
# zero and carry the whole update in a rank-16 product, so the rate that moves full weights enough
# barely moves them (measured: at 1e-4 PPO closed a quarter of the gold gap it closed at 5e-4).
FULL_WEIGHTS_LR = 1e-4
ADAPTERS_LR = 5e-4

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 64  # held-out prompts per generate call in the start/end evaluation


@dataclasses.dataclass
class PPOConfig(RunArguments):
    policy: str = flag(
        "tiny", "The SFT model to start from (a local HF directory, an SFT run dir, or 'tiny')."
    )
    reward_model: str | None = flag(
        None,
        "The reward model: `fastrlhf rm` output or any AutoModelForSequenceClassification directory with "
        "one label; 'none' with --reward-fn only.",
    )
    prompts: str = flag(
        "sample", "PPO prompt JSONL ({\"prompt\"}, extra fields ignored); 'sample' = bundled."
    )
    eval_prompts: str | None = flag(
        None, "Held-out prompts for the start/end comparison; default: a user split."
    )
    validation_fraction: float = flag(
        0.2, "Held-out share of --prompts (whole users, at least this share) when --eval-prompts is unset."
    )
    advantage_estimator: str = flag(
        "gae",
        "gae (PPO with a critic, InstructGPT), or critic-free: grpo, rloo, reinforce++, "
        "reinforce++-baseline (no critic or value head is loaded).",
    )
    samples_per_prompt: int = flag(
        1, "Responses sampled per prompt (k); grpo, rloo and reinforce++-baseline compare them (k >= 2)."
    )
    norm_by_std: bool = flag(True, "grpo: divide by the group's std (false: Dr. GRPO, mean baseline only).")
    ptx_data: str | None = flag(None, "Pretraining text JSONL ({\"text\"}) for PPO-ptx; 'sample' = bundled.")
    ptx_coef: float = flag(
        1.0,
        "γ of PPO-ptx: the pretraining LM loss's weight relative to the RL term (the LM loss is scaled by "
        "the minibatch's mean |advantage|, so γ means the same for any reward scale; see docs).",
    )
    ptx_batch_size: int = flag(4, "Pretraining sequences per micro-batch.")
    eval_text: str = flag(
        "sample",
        "Text JSONL whose held-out lines measure the alignment tax: the LM perplexity before/after and the "
        "policy's KL to the SFT policy on them.",
    )
    actor_critic: str = flag(
        "separate",
        "Memory mode: separate (own critic), shared (one trunk), lora (adapters; rank --lora-r, "
        f"{DEFAULT_LORA_RANK} when unset).",
    )
    steps: int = flag(60, "PPO steps (one rollout and its update each).")
    save_every: int = flag(
        20, "Write a resumable checkpoint every N PPO steps, and at the end (0: at the end only)."
    )
    rollout_batch_size: int = flag(32, "Prompts per rollout on each process (each sampled k times).")
    minibatch_size: int = flag(
        16, "Rollout rows (responses) per optimizer step (split into --gradient-accumulation-steps)."
    )
    ppo_epochs: int = flag(2, "Passes over each rollout.")
    old_logprobs: str = flag(
        "auto",
        "Where the ratio's π_old comes from. auto: when each rollout gets one optimizer step "
        "(--ppo-epochs 1 and --minibatch-size >= the rollout's rows) the policy has not moved since "
        "sampling, so the update's own forward, detached, is π_old (the ratio is exactly 1), the KL penalty "
        "takes the sampler's log-probs, and the separate old-log-prob pass is skipped; otherwise the pass "
        "runs. recompute: always run the pass.",
    )
    max_new_tokens: int = flag(24, "Response tokens to sample at most.")
    temperature: float = flag(
        1.0, "Sampling temperature; every log-prob, KL and entropy is taken at the same temperature."
    )
    top_p: float = flag(
        1.0,
        "Must stay 1: PPO's ratio and KL need the log-probs of the distribution sampled from, which are "
        "those of the full tempered softmax (use --temperature to sharpen sampling).",
    )
    sampler: str = flag(
        "fastrlhf",
        "Rollout sampler: fastrlhf (a lean KV-cache decode loop with the fused ops.sample) or hf "
        "(transformers' generate).",
    )
    max_prompt_tokens: int = flag(256, "Longer prompts keep their last tokens.")
    kl_coef: float = flag(0.05, "β of the KL penalty to the SFT policy at the start (InstructGPT: 0.02).")
    target_kl: float = flag(
        4.0,
        "Adapt β toward this KL per response, in nats (Ziegler et al.), which bounds how far the reward "
        "model can be over-optimised; 0: fixed β.",
    )
    kl_horizon: int = flag(
        256, "Time constant of the adaptive β, in samples (Ziegler et al.: 10000 for runs of millions)."
    )
    kl_estimator: str = flag("k1", "KL estimator of the penalty: k1, k2, k3 or abs.")
    kl_penalty: str = flag(
        "reward", "Where β·KL goes: reward (InstructGPT's shaped reward) or loss (GRPO-style KL loss)."
    )
    gamma: float = flag(1.0, "Discount (GAE and reinforce++).")
    lam: float = flag(0.95, "GAE λ.")
    whiten_advantages: bool = flag(True, "gae: whiten the advantages over the rollout's tokens.")
    clip_eps: float = flag(0.2, "PPO ratio clip range.")
    clip_eps_high: float | None = flag(None, "Upper clip range when it differs (DAPO's clip-higher).")
    value_clip: float = flag(0.2, "Value clip range (0: no clipping).")
    vf_coef: float = flag(0.1, "Weight of the value loss.")
    calibrate_critic: bool = flag(
        True,
        "At the first rollout, map the critic's head (started from the reward model, raw scores) through "
        "the score normalisation, so the values start on the returns' scale (false: leave it raw).",
    )
    entropy_coef: float = flag(0.0, "Entropy bonus.")
    reward_norm: str = flag(
        "running", "Scores onto a unit scale first: running (mean/std of all scores so far), batch, none."
    )
    score_clip: float = flag(0.0, "Clip normalised scores to [-c, c] (0: no clipping).")
    missing_eos_penalty: float = flag(
        1.0, "Subtract this from the normalised score of a response cut off before its EOS (0: off)."
    )
    reward_fn: str | None = flag(None, "A rule reward module:function(prompts, responses) -> list[float].")
    reward_fn_weight: float = flag(1.0, "Weight of --reward-fn when added to the reward model's score.")
    eval_reward_fn: str | None = flag(
        None,
        "A ground-truth module:function (e.g. fastrlhf.data.synthetic:gold_reward for the bundled data): "
        "logged on every rollout (gold/mean) and on the held-out responses, never trained on; it exposes "
        "reward hacking.",
    )
    eval_samples: int = flag(4, "Sampled responses per held-out prompt in the start/end evaluation.")
    eval_max_new_tokens: int = flag(24, "Response tokens in the start/end evaluation.")
    ema_decay: float = flag(0.0, "EMA of the policy weights saved as the final model (paper: 0.992; 0: off).")
    learning_rate: float | None = flag(
        None,
        f"Peak learning rate; unset: {FULL_WEIGHTS_LR:g} when the policy's weights train, "
        f"{ADAPTERS_LR:g} when LoRA adapters do (--actor-critic lora, or --lora-r > 0).",
    )
    shard_frozen_above_mib: float = flag(
        DEFAULT_SHARD_FROZEN_ABOVE_MIB,
        "Under FSDP, shard the frozen reference and reward model when their parameters exceed this many "
        "MiB (0: always); smaller ones are replicated on every process.",
    )

    def __post_init__(self):
        if self.actor_critic == "lora" and self.lora_r == 0:
            # Asking for adapters is enough: they get the default rank (recorded in config.yaml).
            self.lora_r = DEFAULT_LORA_RANK
        if self.learning_rate is None:  # resolved here, so config.yaml records the rate used
            self.learning_rate = ADAPTERS_LR if self.lora_r > 0 else FULL_WEIGHTS_LR
        super().__post_init__()
        if self.actor_critic not in MODES:
            raise InputError(f"actor_critic: expected one of {MODES}, got {self.actor_critic!r}")
        for name in (
            "steps",
            "rollout_batch_size",
            "minibatch_size",
            "ppo_epochs",
            "max_new_tokens",
            "ptx_batch_size",
            "max_prompt_tokens",
            "eval_max_new_tokens",
            "eval_samples",
            "samples_per_prompt",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.minibatch_size % self.gradient_accumulation_steps:
            raise InputError(
                f"minibatch_size ({self.minibatch_size}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps})"
            )
        if self.reward_model in (None, "none") and not self.reward_fn:
            raise InputError("reward_model: give a reward model, or --reward-model none with --reward-fn")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            raise InputError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not self.shard_frozen_above_mib >= 0:  # NaN too
            raise InputError(f"shard_frozen_above_mib must be >= 0, got {self.shard_frozen_above_mib}")
        choices = {
            "kl_estimator": ("k1", "k2", "k3", "abs"),
            "advantage_estimator": ESTIMATORS,
            "kl_penalty": KL_PLACEMENTS,
            "reward_norm": NORMALIZATIONS,
            "sampler": SAMPLERS,
            "old_logprobs": OLD_LOGPROB_SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name}: expected one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        grouped = self.advantage_estimator in ("grpo", "rloo", "reinforce++-baseline")
        if grouped and self.samples_per_prompt < 2:
            raise InputError(
                f"samples_per_prompt: {self.advantage_estimator} compares the responses to one prompt, "
                f"so it needs >= 2 (e.g. --samples-per-prompt 4), got {self.samples_per_prompt}"
            )
        if self.top_p != 1.0:
            raise InputError(
                f"top_p={self.top_p}: PPO refuses nucleus sampling, because its ratio, KL and entropy "
                "are computed from the full softmax at --temperature, which would not be the distribution "
                "the tokens came from; lower --temperature instead"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"temperature must be > 0 (PPO samples), got {self.temperature}")
        non_negative = ("ptx_coef", "kl_coef", "target_kl", "score_clip", "vf_coef", "value_clip")
        for name in (*non_negative, "entropy_coef", "missing_eos_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be finite and >= 0, got {value}")

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.gradient_accumulation_steps

    @property
    def rollout_rows(self) -> int:
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def single_update_per_rollout(self) -> bool:
        """Whether ``old_logprobs="auto"`` may take π_old from the update's own forward: one epoch over one
        minibatch, so every micro-batch's forward runs on the weights that sampled the rollout."""
        return (
            self.old_logprobs == "auto" and self.ppo_epochs == 1 and self.minibatch_size >= self.rollout_rows
        )


@dataclasses.dataclass
class PPOData:
    """Tokenised prompts and texts of a run."""

    tokenizer: object
    train_ids: list[tuple[int, ...]]
    train_prompts: list[str]
    evaluation: EvalSet
    ptx_sequences: list
    gold_fn: object | None


@dataclasses.dataclass
class PPOModels:
    """The trained model (accelerate-prepared), its optimizer and schedule, and what scores rollouts."""

    model: torch.nn.Module
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    reward_model: RewardModel | None
    reward_fn: object | None
    ema: WeightEMA | None
    parameter_bytes: dict
    sharded_frozen: tuple[str, ...] = ()  # the frozen models sharded under FSDP (the others: replicated)


def train_ppo(config: PPOConfig) -> dict:
    """Run PPO (or a critic-free estimator); returns the summary (also in summary.json)."""
    # All inputs read and checked before the run directory is touched.
    require_plain_logits(load_config(config.policy, config.trust_remote_code), config.policy)
    data = load_ppo_data(config)
    run = TrainingRun(config)
    accelerator, device = run.accelerator, run.device
    models = build_ppo_models(config, accelerator, data, run)
    kl = KLController(config.kl_coef, config.target_kl or None, config.kl_horizon)
    normalizer = ScoreNormalizer(config.reward_norm)
    state = run.restore(modules=checkpointed_modules(models))
    step, kl.value = state.get("step", 0), state.get("kl_coef", kl.value)
    if "score_norm" in state:
        normalizer.load_state(state["score_norm"])
    start_eval = state.get("start_eval") or evaluate(models, data, config, device, at_start=True)
    if not state:
        run.log(0, eval_metrics(start_eval))
    run.start_progress(config.steps, step, f"{config.advantage_estimator}[{config.actor_critic}]")
    ptx_stream = ptx_stream_at(config, data, step, device)

    with StopOnSignals() as stop:
        while step < config.steps:
            prompt_rows = prompt_order(
                len(data.train_ids),
                step,
                config.rollout_batch_size,
                accelerator.process_index,
                accelerator.num_processes,
                config.seed,
            )
            with gathered_for_generation(models.unwrapped):
                rollout = collect_rollout(
                    models.unwrapped.generation_model(),
                    models.reward_model,
                    models.reward_fn,
                    data.tokenizer,
                    [data.train_ids[i] for i in prompt_rows],
                    [data.train_prompts[i] for i in prompt_rows],
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    batch_size=config.rollout_batch_size,
                    samples_per_prompt=config.samples_per_prompt,
                    reward_fn_weight=config.reward_fn_weight,
                    device=device,
                    sampler=config.sampler,
                )
            update_start = time.perf_counter()
            normalizer.update(accelerator.gather(rollout.scores))
            if step == 0 and config.calibrate_critic and models.unwrapped.has_critic:
                with zero3_modifiable(models.unwrapped, models.unwrapped.parameters()):
                    calibrate_critic(models.unwrapped, normalizer, accelerator.gather(rollout.scores))
                refresh_master_weights(accelerator)
            with zero3_gathered(models.unwrapped):  # the passes read the lm_heads directly
                experience = make_experience(models.unwrapped, rollout, config, kl.value, normalizer)
            stats, first_epoch_approx_kl, grad_norm = ppo_update(
                models.model,
                accelerator,
                models.optimizer,
                models.scheduler,
                rollout,
                experience,
                config,
                kl.value,
                ptx_stream,
                models.ema,
                run.guard,
                step + 1,
            )
            mean_kl = float(accelerator.gather(experience.kl).mean())
            metrics = step_metrics(rollout, experience, stats, data, config, kl.value, mean_kl) | {
                "policy/first_epoch_approx_kl": first_epoch_approx_kl,
                "tokens_per_s/training": float(rollout.mask.sum())
                * config.ppo_epochs
                / (time.perf_counter() - update_start),
                "memory/peak_mib": peak_memory_mib(device),
                "lr": models.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "skipped_nonfinite_steps": run.guard.skipped,
            }
            # Every process's rollout counts, not the main process's alone.
            metrics = global_metrics(accelerator, metrics, maximum=MAXIMUM_METRICS, total=TOTAL_METRICS)
            kl.update(mean_kl, rollout.rows * accelerator.num_processes)
            step += 1
            run.progress.update(1)
            if step % config.log_every == 0 or step == config.steps:
                run.log(step, metrics, bar=PROGRESS_BAR)
            stopping = run.stop_requested(stop)
            if (config.save_every and step % config.save_every == 0) or step == config.steps or stopping:
                trainer_state = {"kl_coef": kl.value, "start_eval": start_eval}
                trainer_state["score_norm"] = normalizer.state()
                run.checkpoint(step, trainer_state, models.unwrapped, checkpointed_modules(models))
            if stopping:
                run.interrupted(stop, step)

    end_eval = evaluate(models, data, config, device)
    run.log(step, eval_metrics(end_eval))
    # With an EMA, the averaged weights are what is saved (swapped in, then gathered like the trained ones),
    # into the shards the averages were taken of.
    reshard_all(models.unwrapped)
    averaged = models.ema.swapped_into(models.unwrapped.policy_lm) if models.ema else contextlib.nullcontext()
    with averaged:
        model_dir = run.save_model(
            models.model,
            data.tokenizer,
            save_fn=_save_policy,
            part=lambda actor_critic: actor_critic.policy_lm,
        )
    summary = summarize(run, config, models, data, start_eval, end_eval, kl.value, model_dir, step)
    # Freed before the plots (TrainingRun.finish); a resumed, finished run never made a rollout.
    models = rollout = experience = stats = ptx_stream = None
    return run.finish(summary, PLOT_GROUPS)


# ---- setup -----------------------------------------------------------------------------------------


def load_ppo_data(config: PPOConfig) -> PPOData:
    """Tokenised train and held-out prompts, ptx and perplexity texts, and the judges of the evaluation."""
    tokenizer = load_tokenizer(resolve_model(config.policy), config.trust_remote_code)
    truncation = TruncationPolicy(config.max_prompt_tokens, 1)
    train_prompts, eval_prompts = split_prompts(config)
    train_ids, _ = tokenize_prompts(train_prompts, tokenizer, truncation)
    eval_ids, _ = tokenize_prompts(eval_prompts, tokenizer, truncation)
    if not eval_prompts:
        log.warning(
            "no held-out prompts (--validation-fraction %g held none out): the start/end evaluation of "
            "responses is skipped; pass --eval-prompts or a larger --validation-fraction to measure it",
            config.validation_fraction,
        )
    ptx_sequences, perplexity_sequences = split_texts(config.ptx_data, config.eval_text, tokenizer)
    gold_fn = load_reward_fn(config.eval_reward_fn) if config.eval_reward_fn else None
    evaluation = EvalSet(
        [s.input_ids for s in eval_ids],
        [p.prompt for p in eval_prompts],
        perplexity_sequences,
        reward_model=None,  # set by build_ppo_models, which loads it
        reward_fn=load_reward_fn(config.reward_fn) if config.reward_fn else None,
        gold_fn=gold_fn,
        reward_fn_weight=config.reward_fn_weight,
    )
    return PPOData(
        tokenizer,
        [s.input_ids for s in train_ids],
        [p.prompt for p in train_prompts],
        evaluation,
        ptx_sequences,
        gold_fn,
    )


def build_ppo_models(
    config: PPOConfig, accelerator, data: PPOData | None = None, run: TrainingRun | None = None
) -> PPOModels:
    """The reward model, the actor (and critic for GAE) of ``--actor-critic``, optimizer, schedule, EMA,
    prepared by ``accelerator`` (through ``run`` when given, which can then gather a sharded model to
    save it). With ``data``, its evaluation set gets the reward model too."""
    device = accelerator.device
    # Built whole under ZeRO-3 too: the frozen models run outside DeepSpeed's engine, which partitions
    # the trained one when it is prepared.
    with whole_model_construction(accelerator):
        reward_model = load_frozen_reward_model(config, device)
        rm_path = resolve_model(config.reward_model) if reward_model is not None else None
        model = build_actor_critic(
            config.actor_critic,
            resolve_model(config.policy),
            rm_path,
            config,
            device_index=accelerator.local_process_index,
            with_critic=config.advantage_estimator == "gae",
        )
    parameter_bytes = model.memory_report()
    if reward_model is not None:
        parameter_bytes["reward_model"] = sum(p.numel() * p.element_size() for p in reward_model.parameters())
    optimizer = build_optimizer(
        param_groups(model, config.weight_decay),
        config.optimizer,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    optimizer_steps = config.ppo_epochs * math.ceil(config.rollout_rows / config.minibatch_size)
    from fastrlhf.train.optim import build_scheduler

    n = accelerator.num_processes  # accelerate's prepared scheduler advances once per process per step
    scheduler = build_scheduler(
        optimizer, config.steps * optimizer_steps * n, config.warmup_steps * n, config.final_lr_fraction
    )
    if run is not None:
        leave_out = (model.reference_lm,) if model.reference_lm is not None else ()
        model, optimizer, scheduler = run.prepare_models(
            model, optimizer, scheduler, leave_out=leave_out, micro_batch_size=config.micro_batch_size
        )
    else:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = unwrap_model(accelerator, model)
    head = unwrapped.lm_head
    track_zero3_model(accelerator, model, unwrapped, external=(head.weight, head.bias))
    threshold, sharded = config.shard_frozen_above_mib, []
    if reference := unwrapped.reference_lm:
        reference.to(device)
        # The reference runs through its decoder (its lm_head is read directly): that is the unit root.
        decoder, _ = decoder_and_head(reference)
        if shard_frozen(decoder, reference._no_split_modules, threshold, "reference"):
            sharded.append("reference")
    if reward_model is not None and shard_frozen(
        reward_model, reward_model._no_split_modules, threshold, "reward_model"
    ):
        sharded.append("reward_model")
    ema = WeightEMA(unwrapped.policy_lm, config.ema_decay) if config.ema_decay else None
    if data is not None:
        data.evaluation.reward_model = reward_model
    reward_fn = data.evaluation.reward_fn if data is not None else None
    return PPOModels(
        model, unwrapped, optimizer, scheduler, reward_model, reward_fn, ema, parameter_bytes, tuple(sharded)
    )


def checkpointed_modules(models: PPOModels) -> dict:
    """What a PPO checkpoint holds besides accelerate's state: the EMA of the policy, as safetensors."""
    return {"ema": models.ema} if models.ema is not None else {}


def load_frozen_reward_model(config: PPOConfig, device) -> RewardModel | None:
    if config.reward_model in (None, "none"):
        return None
    path = resolve_model(config.reward_model)
    if not is_reward_model(path):
        raise InputError(f"reward_model: {config.reward_model} {NOT_A_REWARD_MODEL}")
    reward_model = RewardModel.from_pretrained(
        path,
        ModelOptions(
            dtype=config.dtype,
            attn_implementation=config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
        ),
    )
    reward_model.eval().requires_grad_(False)
    return reward_model.to(device)


def calibrate_critic(model, normalizer: ScoreNormalizer, scores: torch.Tensor) -> None:
    """Put the critic's values on the scale of the normalised scores (``ActorCritic.rescale_values``),
    with the normaliser's moments after the first rollout's ``scores`` (``[N]``, all processes'). Scores
    without spread (a constant reward) give no scale: then the values are only shifted."""
    shift, divisor = normalizer.affine(scores)
    if scores.numel() < 2 or float(scores.double().std()) == 0.0:
        divisor = 1.0
    model.rescale_values(shift, divisor)
    log.info("critic calibrated to the normalised scores: values (v - %.4g) / %.4g", shift, divisor)


def split_prompts(config: PPOConfig):
    """(train, held-out) prompt records: ``--eval-prompts``, or a user-disjoint split of ``--prompts`` holding
    out at least ``--validation-fraction`` of them.
    Either way a prompt text that is held out is never trained on, even when another user asked it too."""
    records = read_jsonl(data_path(config.prompts, "ppo", "prompts"), "ppo")
    if config.eval_prompts:
        held_out = read_jsonl(data_path(config.eval_prompts, "ppo", "eval_prompts"), "ppo")
        train = records
    else:
        train, held_out = split_users_by_share(records, config.validation_fraction, config.seed)
    held_texts = {r.prompt for r in held_out}
    train = [r for r in train if r.prompt not in held_texts]
    if not train:
        raise InputError(f"prompts: the held-out prompts cover every prompt of {config.prompts}")
    return train, held_out


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


def ptx_stream_at(config: PPOConfig, data: PPOData, step: int, device):
    """The PPO-ptx batch stream positioned where step ``step`` starts (None without ptx data)."""
    if not data.ptx_sequences:
        return None
    stream = ptx_batches(
        data.ptx_sequences, config.ptx_batch_size, config.seed, data.tokenizer.pad_token_id, device
    )
    micro_per_step = config.ppo_epochs * math.ceil(config.rollout_rows / config.micro_batch_size)
    for _ in range(step * micro_per_step):
        next(stream)  # a resumed run continues the ptx stream where it stopped
    return stream


# ---- evaluation, metrics and the summary ----------------------------------------------------------


def evaluate(models: PPOModels, data: PPOData, config: PPOConfig, device, at_start: bool = False) -> dict:
    """The held-out evaluation (``evaluate_policy``). ``at_start`` the policy is still its reference, so
    the text KL is 0 without its passes."""
    evaluation = evaluate_policy(
        models.unwrapped,
        data.tokenizer,
        data.evaluation,
        temperature=config.temperature,
        samples=config.eval_samples,
        max_new_tokens=config.eval_max_new_tokens,
        seed=config.seed + 12345,
        # A fixed batch size: the same seed then draws the same samples whatever the run's rollout size,
        # so runs from one SFT policy start from the very same evaluation.
        batch_size=EVAL_BATCH_SIZE,
        device=device,
        with_text_kl=not at_start,
    )
    if at_start:
        evaluation["text_kl"] = 0.0 if data.evaluation.texts else float("nan")
    return evaluation


def eval_metrics(evaluation: dict) -> dict:
    metrics = {"eval/perplexity": evaluation["perplexity"]}
    if evaluation.get("text_kl") is not None:  # absent from a start evaluation an older version stored
        metrics["eval/text_kl"] = evaluation["text_kl"]
    for kind in ("greedy", "sampled"):
        if kind in evaluation:
            metrics[f"eval/{kind}_rm"] = evaluation[kind]["rm_mean"]
            if evaluation[kind]["gold_mean"] is not None:
                metrics[f"eval/{kind}_gold"] = evaluation[kind]["gold_mean"]
    return metrics


def step_metrics(rollout, experience, stats, data: PPOData, config: PPOConfig, kl_coef, mean_kl) -> dict:
    """What a user watches for learning and for reward hacking: the reward model's and (when known) the
    ground truth's score of the rollout, KL, entropy, length, clip fraction, the critic's fit."""
    metrics = {
        k: torch.stack([s[k].float() for s in stats]).amax()
        if k in MAXIMUM_METRICS
        else torch.stack([s[k].float() for s in stats]).mean()
        for k in stats[0]
        if stats[0][k] is not None
    }
    metrics.update(
        {
            "score/mean": rollout.scores.mean(),
            "score/normalized": experience.scores.mean(),
            "kl/ref": mean_kl,
            "kl/coef": kl_coef,
            "response/length": rollout.response_lengths.float().mean(),
            "response/ended_with_eos": rollout.ended_with_eos.float().mean(),
            "tokens_per_s/generation": float(rollout.response_lengths.sum())
            / max(rollout.generation_seconds, 1e-9),
        }
    )
    if data.gold_fn is not None:
        gold = call_reward_fn(data.gold_fn, rollout.prompts, rollout.responses)
        metrics["gold/mean"] = statistics.fmean(gold)
    sampled = rollout.sampled_logprobs
    # On-policy, the update measured the gap against its own forward (in the stats above).
    if sampled is not None and not experience.on_policy:
        # The sampler's log-probs (KV-cached decoding) against the trainer's old log-probs of the same
        # tokens (one full forward): equal in exact arithmetic, so the gap is pure numerics. A large one
        # means the rollout did not sample the distribution the ratio assumes.
        old = experience.old_logprobs[rollout.mask].float()
        # The same keys on every process (the metrics are gathered): NaN if the two ever disagree in size.
        gap = (old - sampled).abs() if old.shape == sampled.shape else torch.full((1,), math.nan)
        metrics["rollout/logprob_gap_mean"] = gap.mean()
        metrics["rollout/logprob_gap_max"] = gap.max()
    if experience.values is not None:
        metrics["value/explained_variance"] = explained_variance(
            experience.values, experience.returns, rollout.mask
        )
    return metrics


# Over several processes a logged metric is the mean of the processes' values, except these.
MAXIMUM_METRICS = ("rollout/logprob_gap_max", "memory/peak_mib")
TOTAL_METRICS = ("tokens_per_s/generation", "tokens_per_s/training")

# The progress bar's postfix, in words a reader knows: the RM score, the gold score when a --eval-reward-fn
# knows one, the KL to the SFT policy (nats per response), the clipped share of tokens, and the speed.
PROGRESS_BAR = {
    "score": "score/mean",
    "gold": "gold/mean",
    "KL": "kl/ref",
    "clip fraction": "policy/clip_fraction",
    "tokens/s": "tokens_per_s/training",
}
PLOT_GROUPS = {
    "score": ["score/mean", "gold/mean", "eval/sampled_rm", "eval/sampled_gold"],
    "kl": ["kl/ref"],
    "kl_coef": ["kl/coef"],
    "entropy": ["policy/entropy"],
    "clip_fraction": ["policy/clip_fraction", "value/clip_fraction"],
    "value": ["value/loss", "value/explained_variance"],
    "approx_kl": ["policy/approx_kl"],
    "rollout_logprob_gap": ["rollout/logprob_gap_mean", "rollout/logprob_gap_max"],
    "response_length": ["response/length"],
    "throughput": ["tokens_per_s/generation", "tokens_per_s/training"],
    "memory": ["memory/peak_mib"],
    "ptx": ["ptx/loss"],
    "perplexity": ["eval/perplexity"],
    "text_kl": ["eval/text_kl"],
    "lr": ["lr"],
}


def summarize(run, config, models, data, start_eval, end_eval, kl_coef, model_dir, steps) -> dict:
    """The run's summary; the per-response scores of both evaluations go to ``evaluation.json``."""
    from fastrlhf.train.io import atomic_write_json
    from fastrlhf.train.metrics import jsonable, read_metrics

    if run.is_main:
        evaluations = jsonable({"start": start_eval, "end": end_eval}, "evaluation")
        atomic_write_json(run.run_dir / "evaluation.json", evaluations)

    metrics = [m for m in read_metrics(run.run_dir / "metrics.jsonl") if "score/mean" in m]
    return {
        "task": "ppo",
        "advantage_estimator": config.advantage_estimator,
        "samples_per_prompt": config.samples_per_prompt,
        "model_dir": str(model_dir),
        "actor_critic": config.actor_critic,
        "steps": steps,
        # One rollout's mean is noisy: start and end average the first and last tenth of the steps (1-10).
        "score_start": _window_mean(metrics, "score/mean", first=True),
        "score_end": _window_mean(metrics, "score/mean", first=False),
        "gold_start": _window_mean(metrics, "gold/mean", first=True),
        "gold_end": _window_mean(metrics, "gold/mean", first=False),
        "kl_end": _window_mean(metrics, "kl/ref", first=False),
        "entropy_end": _window_mean(metrics, "policy/entropy", first=False),
        **compare(start_eval, end_eval),
        "eval_examples_start": start_eval.get("greedy", {}).get("examples"),
        "eval_examples_end": end_eval.get("greedy", {}).get("examples"),
        "ptx": bool(data.ptx_sequences),
        "ema_decay": config.ema_decay or None,
        "kl_coef_end": kl_coef,
        "parameter_bytes": models.parameter_bytes,
        "sharded_frozen_models": list(models.sharded_frozen),
        "peak_memory_mib": peak_memory_mib(run.device),
        "optimizer": type(models.optimizer.optimizer).__name__,
        "train_prompts": len(data.train_ids),
        "eval_prompts": len(data.evaluation.prompts),
    }


def _window_mean(metrics: list[dict], key: str, first: bool) -> float | None:
    values = [m[key] for m in metrics if m.get(key) is not None]
    if not values:
        return None
    window = max(1, min(10, len(values) // 10))
    part = values[:window] if first else values[-window:]
    return sum(part) / len(part)


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
