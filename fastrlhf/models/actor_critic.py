"""The policy, its value function and the frozen reference, arranged in one of three memory modes.

What each mode holds (``P`` = one copy of the policy's weights, ``R`` = the reward model's):

- ``separate`` (the paper's way): the policy ``P``, a frozen reference ``P``, and a critic initialised
  from the reward model (its trunk and head, ``R``); plus the frozen reward model ``R``. Weights: 2P + 2R,
  and the optimizer state of P + R.
- ``shared``: one trunk carries the LM head and a value head (started from the reward model's head), so
  one forward gives both the log-probs and the values. Weights: 2P + R (a whole model less than
  ``separate``), optimizer state of P.
- ``lora``: one frozen base (optionally 8/4-bit) carries a policy adapter and a critic adapter with a
  value head; the reference is the same base with the adapters switched off. Weights: P + R plus the
  adapters; optimizer state of the adapters only. There is no second copy of the base weights.

A critic-free run (GRPO, RLOO, REINFORCE++) builds any mode without its critic: no critic model, no value
head, no critic adapter; ``forward`` then returns ``values=None``.

``forward`` is the training pass (it goes through the DDP wrapper, so gradients are synchronised); the
no-grad passes of the rollout (``reference_hidden``, ``generation_model``) use the unwrapped module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn

from fastrlhf.errors import InputError
from fastrlhf.models.heads import ScalarHead
from fastrlhf.models.loading import (
    ModelOptions,
    add_lora,
    dtype_name,
    load_causal_lm,
    load_config,
    weights_dtype,
)
from fastrlhf.models.policy import decoder_and_head, require_plain_logits
from fastrlhf.models.reward_model import RewardModel
from fastrlhf.models.reward_model_format import read_score_head
from fastrlhf.models.tiny import resolve_model

log = logging.getLogger(__name__)

MODES = ("separate", "shared", "lora")
PARTS = ("both", "policy", "critic")  # what a forward of ``separate`` mode runs
POLICY_ADAPTER, CRITIC_ADAPTER = "policy", "critic"


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def value_head_from_reward_model(reward_model_path: str | None, hidden_size: int) -> ScalarHead:
    """A value head started from the reward model's score head when the sizes match (else fresh)."""
    head = ScalarHead(hidden_size)
    if reward_model_path is None:
        return head
    saved = read_score_head(resolve_model(reward_model_path))
    if saved is not None and saved.weight.shape != head.proj.weight.shape:
        log.info("value head: reward model hidden size differs from the policy's; starting a fresh head")
        return head
    if saved is not None:
        with torch.no_grad():
            head.proj.weight.copy_(saved.weight)
            # The values start as the reward model's scores; train_ppo maps them onto the normalised
            # scores' scale at the first rollout (ActorCritic.rescale_values).
            head.proj.bias.fill_(saved.offset)
    return head


class ActorCritic(nn.Module):
    """``forward(**inputs) -> (hidden[B, T, H], values[B, T] or None)``: the policy's last hidden states
    (the loss applies ``lm_head`` to the response rows) and the critic's per-position values (None
    without a critic)."""

    def __init__(
        self,
        mode: str,
        policy_lm: nn.Module,
        value_head: ScalarHead | None = None,
        critic: RewardModel | None = None,
        reference_lm: nn.Module | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise InputError(f"actor_critic: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.policy_lm = policy_lm
        self.value_head = value_head
        self.critic = critic
        # The frozen reference is not a submodule's parameter set to train; keeping it out of
        # ``parameters()`` keeps it out of the optimizer, DDP's buckets and the checkpoints.
        self._reference = [reference_lm] if reference_lm is not None else []

    @property
    def config(self):
        return self.policy_lm.config

    @property
    def lm_head(self) -> nn.Linear:
        return decoder_and_head(self.policy_lm)[1]

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or self.value_head is not None

    @property
    def reference_lm(self) -> nn.Module | None:
        return self._reference[0] if self._reference else None

    # ---- the training pass -----------------------------------------------------------------------

    def _policy_hidden(self, inputs: dict) -> torch.Tensor:
        decoder, _ = decoder_and_head(self.policy_lm)
        return decoder(**inputs).last_hidden_state

    @contextlib.contextmanager
    def _adapter(self, name: str):
        """Run the block with LoRA adapter ``name`` active, keeping both adapters trainable.

        peft's ``set_adapter`` also freezes the inactive adapter; both must stay trainable because one
        optimizer step updates the policy and the critic adapters together.
        """
        self.policy_lm.base_model.set_adapter(name)
        self._unfreeze_adapters()
        try:
            yield
        finally:
            self.policy_lm.base_model.set_adapter(POLICY_ADAPTER)
            self._unfreeze_adapters()

    def _unfreeze_adapters(self) -> None:
        for name, parameter in self.policy_lm.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)

    def forward(self, value_rows: int | None = None, part: str = "both", head_fn=None, **inputs):
        """Policy hidden states for all rows, values for the first ``value_rows`` rows (all when None).

        ``part`` (``separate`` mode only): ``"policy"`` runs the policy alone (``values`` is None),
        ``"critic"`` the separate critic alone (``hidden`` is None). The update backpropagates the policy's
        loss before the critic's forward this way, so the two trunks' activations are never held at once.

        ``head_fn(hidden[B, T, H], lm_head)``, when given, runs inside this forward on the policy's hidden
        states and its result is returned in their place. The fused losses read the lm_head's weight
        directly; ZeRO-3 holds that weight whole only during this module's forward and backward (it is
        registered as an external parameter of this module, ``zero.track_zero3_model``).
        """
        hidden, values = self._forward(value_rows, part, inputs)
        if head_fn is not None and hidden is not None:
            hidden = head_fn(hidden, self.lm_head)
        return hidden, values

    def _forward(self, value_rows: int | None, part: str, inputs: dict):
        inputs.setdefault("use_cache", False)
        if part != "both":
            if part not in PARTS or self.mode != "separate" or self.critic is None:
                raise InputError(
                    f"actor_critic: part={part!r} needs mode='separate' with a critic and one of {PARTS}"
                )
            if part == "policy":
                return self._policy_hidden(inputs), None
            return None, self.critic_values(**inputs)
        if not self.has_critic:
            return self._policy_hidden(inputs), None
        if value_rows == 0:  # log-probs only (e.g. perplexity): no critic pass at all
            hidden = self._policy_hidden(inputs)
            return hidden, hidden.new_zeros(0, hidden.shape[1], dtype=torch.float32)
        rows = slice(None) if value_rows is None else slice(0, value_rows)
        value_inputs = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        if self.mode == "lora":
            with self._adapter(CRITIC_ADAPTER):
                critic_hidden = self._policy_hidden(value_inputs)
            hidden = self._policy_hidden(inputs)
            return hidden, self.value_head(critic_hidden)
        hidden = self._policy_hidden(inputs)
        if self.mode == "shared":
            return hidden, self.value_head(hidden[rows])
        return hidden, self.critic_values(**value_inputs)

    def critic_values(self, **inputs) -> torch.Tensor:
        """The separate critic's values ``[B, T]`` alone, without the policy's pass (``mode="separate"``)."""
        inputs.setdefault("use_cache", False)
        return self.critic.head(self.critic.hidden_states(**inputs)) + self.critic.normalization_bias

    @torch.no_grad()
    def rescale_values(self, shift: float, divisor: float) -> None:
        """Map the critic's output ``v`` to ``(v - shift) / divisor`` by rewriting its head's weight and
        bias (the trunk is untouched), so every later value is exactly that affine image.

        The critic starts from the reward model, whose head gives raw scores; PPO's returns are in the
        units of the normalised scores (``ScoreNormalizer``). Left on the raw scale, the values sit several
        units off their targets, and the value clip lets them move only ``--value-clip`` per rollout, so
        the critic spends the first tens of steps worse than a constant (explained variance -10 to -1),
        and the advantages it gives are noise. Mapping the head through the score normalisation once, at
        the first rollout, puts the values on the returns' scale from the start.
        """
        if not self.has_critic:
            raise InputError("rescale_values: this actor-critic has no critic (a critic-free estimator)")
        if not (math.isfinite(shift) and math.isfinite(divisor) and divisor > 0):
            raise InputError(f"rescale_values: need a finite shift and divisor > 0, got {shift}, {divisor}")
        head = (self.critic.head if self.critic is not None else self.value_head).proj
        # Besides the head's own bias, a separate critic adds the reward model's normalisation bias.
        offset = float(self.critic.normalization_bias) if self.critic is not None else 0.0
        head.weight.div_(divisor)
        head.bias.copy_((head.bias.double() + offset - shift).div(divisor).sub(offset).to(head.bias.dtype))

    # ---- the rollout's no-grad passes --------------------------------------------------------------

    @torch.no_grad()
    def reference_hidden(self, **inputs) -> tuple[torch.Tensor, nn.Linear]:
        """The frozen reference's last hidden states and its lm_head."""
        inputs.setdefault("use_cache", False)
        if self.mode == "lora":
            with self.policy_lm.disable_adapter():
                return self._policy_hidden(inputs), self.lm_head
        decoder, head = decoder_and_head(self.reference_lm)
        return decoder(**inputs).last_hidden_state, head

    def generation_model(self) -> nn.Module:
        """The module to call ``generate`` on: the policy (with its adapter active, in lora mode)."""
        return self.policy_lm

    def memory_report(self) -> dict:
        """Bytes of parameters held, split by role, counting each shared storage once."""
        seen: set[int] = set()

        def unique_bytes(module: nn.Module | None) -> int:
            total = 0
            for parameter in [] if module is None else module.parameters():
                key = parameter.data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += parameter.numel() * parameter.element_size()
            return total

        report = {
            "policy": unique_bytes(self.policy_lm),
            "reference": unique_bytes(self.reference_lm),
            "critic": unique_bytes(self.critic) + unique_bytes(self.value_head),
        }
        report["trainable"] = sum(p.numel() * p.element_size() for p in self.parameters() if p.requires_grad)
        return report


def build_actor_critic(
    mode: str,
    policy: str,
    reward_model: str | None,
    options: ModelOptions,
    device_index: int = 0,
    with_critic: bool = True,
) -> ActorCritic:
    """Load the policy (the SFT model), the reference and, ``with_critic``, the critic for ``mode``.

    The critic starts from the reward model: its whole trunk and head in ``separate`` mode, its head in
    ``shared`` and ``lora`` modes. Without a reward model (a rule-based reward only), it starts from the
    policy's trunk with a fresh head.
    """
    if mode not in MODES:
        raise InputError(f"actor_critic: expected one of {MODES}, got {mode!r}")
    # Before any weights load: a model whose logits are post-processed cannot be trained here.
    require_plain_logits(load_config(policy, options.trust_remote_code), policy)
    if mode == "lora":
        if options.lora_r <= 0:
            raise InputError("actor_critic=lora: the adapters need a rank, pass --lora-r > 0 (e.g. 16)")
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(ModelOptions)}
        base_options = ModelOptions(**{**fields, "lora_r": 0, "dropout": None})
        base = load_causal_lm(policy, base_options, device_index=device_index)
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        lm = add_lora(base, options, adapter_name=POLICY_ADAPTER)
        if with_critic:
            from peft import LoraConfig

            lm.add_adapter(CRITIC_ADAPTER, LoraConfig(**lora_kwargs(options)))
        if options.dropout is not None:
            from fastrlhf.models.dropout import apply_dropout

            apply_dropout(lm, options.dropout)
        hidden_size = lm.config.hidden_size
        value_head = value_head_from_reward_model(reward_model, hidden_size) if with_critic else None
        model = ActorCritic(mode, lm, value_head=value_head)
        model._unfreeze_adapters()
        return model

    lm = load_causal_lm(policy, options, device_index=device_index, trains=True)
    reference = _frozen(
        load_causal_lm(
            policy,
            ModelOptions(
                # The policy's own dtype, so the KL to the reference is 0 before the first update.
                dtype=dtype_name(weights_dtype(options, trains=True)),
                attn_implementation=options.attn_implementation,
                trust_remote_code=options.trust_remote_code,
            ),
            device_index=device_index,
        )
    )
    if not with_critic:
        return ActorCritic(mode, lm, reference_lm=reference)
    if mode == "shared":
        return ActorCritic(
            mode,
            lm,
            value_head=value_head_from_reward_model(reward_model, lm.config.hidden_size),
            reference_lm=reference,
        )
    critic_source = reward_model if reward_model is not None else policy
    critic = RewardModel.from_pretrained(critic_source, options, device_index=device_index, trains=True)
    return ActorCritic(mode, lm, critic=critic, reference_lm=reference)


def lora_kwargs(options: ModelOptions) -> dict:
    """peft ``LoraConfig`` arguments from the model options (one home for the adapter settings)."""
    targets = options.lora_target_modules
    target_modules = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    return {
        "r": options.lora_r,
        "lora_alpha": options.lora_alpha,
        "lora_dropout": options.lora_dropout,
        "target_modules": target_modules,
        "bias": "none",
    }
