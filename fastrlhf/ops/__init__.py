"""fastrlhf.ops: the fused RLHF kernels behind one functional API.

Every op takes ``backend="auto"`` (overridable with ``FASTRLHF_BACKEND``); see ``available_backends()``.
``reference`` holds the plain-torch definition of every op, which is also the "torch" backend.
"""

from fastrlhf.ops import reference
from fastrlhf.ops._backend import BACKENDS, BackendInfo, available_backends
from fastrlhf.ops.advantages import Advantages, compute_advantages
from fastrlhf.ops.gae import gae, masked_whiten
from fastrlhf.ops.gather_logprobs import gather_logprobs
from fastrlhf.ops.group_advantages import GroupAdvantages, group_advantages
from fastrlhf.ops.kl_penalty import kl_penalty
from fastrlhf.ops.linear_logprobs import linear_logprobs
from fastrlhf.ops.policy_loss import linear_ppo_policy_loss, ppo_policy_loss
from fastrlhf.ops.ranking_loss import pairwise_loss, ranking_loss
from fastrlhf.ops.reference import PolicyLossResult, RankingLossResult, SampleResult, ValueLossResult
from fastrlhf.ops.sample import sample
from fastrlhf.ops.value_loss import value_loss

__all__ = [
    "BACKENDS",
    "Advantages",
    "BackendInfo",
    "GroupAdvantages",
    "PolicyLossResult",
    "RankingLossResult",
    "SampleResult",
    "ValueLossResult",
    "available_backends",
    "compute_advantages",
    "gae",
    "gather_logprobs",
    "group_advantages",
    "kl_penalty",
    "linear_logprobs",
    "linear_ppo_policy_loss",
    "masked_whiten",
    "pairwise_loss",
    "ppo_policy_loss",
    "ranking_loss",
    "reference",
    "sample",
    "value_loss",
]
