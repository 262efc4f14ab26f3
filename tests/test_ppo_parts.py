"""The pieces of the PPO loop that need no model: score normalisation, the critic's explained variance,
the start/end comparison of evaluations, the gap a run closed, and the config's refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastrlhf.errors import InputError
from fastrlhf.train.evaluation import compare
from fastrlhf.train.experience import explained_variance
from fastrlhf.train.pipeline import gap_closed
from fastrlhf.train.ppo import PPOConfig
from fastrlhf.train.rewards import ScoreNormalizer

RULE = dict(reward_model="none", reward_fn="ppo_rewards:constant")


def test_running_normalizer_uses_the_moments_of_every_score_seen():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=generator) * 5 + 3 for n in (7, 1, 32, 2)]
    normalizer = ScoreNormalizer("running")
    for batch in batches:
        normalizer.update(batch)
    seen = torch.cat(batches).double().numpy()
    assert normalizer.count == seen.size
    assert normalizer.mean == pytest.approx(seen.mean(), rel=1e-12)
    probe = torch.tensor([0.0, 3.0, 10.0], dtype=torch.float64)
    expected = (probe.numpy() - seen.mean()) / (seen.std(ddof=1) + normalizer.eps)
    np.testing.assert_allclose(normalizer(probe).numpy(), expected, rtol=1e-10)
    # The state survives a checkpoint as plain numbers.
    restored = ScoreNormalizer("running")
    restored.load_state(normalizer.state())
    assert torch.equal(restored(probe), normalizer(probe))


def test_normalizer_kinds_and_small_batches_are_defined():
    scores = torch.tensor([1.0, 2.0, 4.0])
    batch = ScoreNormalizer("batch")(scores)
    assert float(batch.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(batch.std()) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(ScoreNormalizer("none")(scores), scores)
    one = ScoreNormalizer("running")
    one.update(torch.tensor([5.0]))
    assert one(torch.tensor([5.0])).tolist() == [0.0], "one score: centred, not divided by a zero std"
    assert ScoreNormalizer("batch")(torch.tensor([5.0])).tolist() == [0.0]
    with pytest.raises(ValueError, match="reward_norm"):
        ScoreNormalizer("z-score")


def test_explained_variance_of_perfect_mean_and_bad_critics():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean = returns[mask].mean()
    assert explained_variance(torch.full_like(returns, float(mean)), returns, mask) == pytest.approx(0.0)
    assert explained_variance(-returns, returns, mask) < 0
    assert math.isnan(explained_variance(returns, returns, torch.zeros_like(mask)))


def test_win_rate_pairs_samples_and_counts_ties_as_half():
    def evaluation(gold):
        return {
            "perplexity": 10.0,
            "sampled": {
                "rm": [0.0] * len(gold),
                "rm_mean": 0.0,
                "gold": gold,
                "gold_mean": sum(gold) / len(gold),
                "length_mean": 5.0,
            },
        }

    figures = compare(evaluation([0.0, 0.5, 1.0, 0.5]), evaluation([1.0, 0.5, 0.0, 1.0]))
    assert figures["eval_sampled_win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert figures["eval_sampled_judge"] == "gold"
    assert figures["eval_sampled_gold_start"] == pytest.approx(0.5)


def test_gap_closed():
    assert gap_closed(0.4, 0.7) == pytest.approx(0.5)
    assert gap_closed(0.4, 0.3) == pytest.approx(-1 / 6)
    assert gap_closed(1.0, 1.0) is None and gap_closed(None, 0.5) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"top_p": 0.9}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"advantage_estimator": "grpo"}, "samples_per_prompt"),
        ({"advantage_estimator": "rloo", "samples_per_prompt": 1}, "samples_per_prompt"),
        ({"advantage_estimator": "vtrace"}, "advantage_estimator"),
        ({"kl_penalty": "both"}, "kl_penalty"),
        ({"reward_norm": "z"}, "reward_norm"),
        ({"ptx_coef": -1.0}, "ptx_coef"),
        ({"target_kl": float("nan")}, "target_kl"),
    ],
)
def test_config_refuses_what_ppo_cannot_do_right(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(output=str(tmp_path), **RULE, **flags)


def test_reinforce_plus_plus_and_gae_need_no_group():
    for estimator in ("gae", "reinforce++"):
        PPOConfig(output="unused", advantage_estimator=estimator, samples_per_prompt=1, **RULE)


def test_lora_mode_without_a_rank_gets_the_default_rank(tmp_path):
    from fastrlhf.models.loading import DEFAULT_LORA_RANK
    from fastrlhf.train.config import parse_config

    def parsed(*flags):
        argv = ["--output", str(tmp_path), "--reward-model", "none"]
        argv += ["--reward-fn", "ppo_rewards:digit_fraction"]
        return parse_config(PPOConfig, [*argv, *flags], prog="fastrlhf ppo")

    assert parsed("--actor-critic", "lora").lora_r == DEFAULT_LORA_RANK
    assert parsed("--actor-critic", "lora", "--lora-r", "4").lora_r == 4
    assert parsed("--actor-critic", "separate").lora_r == 0  # full fine-tuning stays the default elsewhere
    # A quantized frozen base needs adapters; in lora mode the default rank provides them.
    assert parsed("--actor-critic", "lora", "--quantization", "4bit").lora_r == DEFAULT_LORA_RANK


def test_the_learning_rate_defaults_to_the_adapters_rate_when_adapters_train(tmp_path):
    from fastrlhf.train.config import parse_config
    from fastrlhf.train.ppo import ADAPTERS_LR, FULL_WEIGHTS_LR

    def parsed(*flags):
        argv = ["--output", str(tmp_path), "--reward-model", "none"]
        argv += ["--reward-fn", "ppo_rewards:digit_fraction"]
        return parse_config(PPOConfig, [*argv, *flags], prog="fastrlhf ppo").learning_rate

    assert ADAPTERS_LR > FULL_WEIGHTS_LR
    assert parsed("--actor-critic", "lora") == ADAPTERS_LR
    assert parsed("--actor-critic", "separate", "--lora-r", "8") == ADAPTERS_LR  # adapters on the policy
    assert parsed("--actor-critic", "shared") == FULL_WEIGHTS_LR
    assert parsed("--actor-critic", "lora", "--learning-rate", "2e-5") == 2e-5  # explicit wins
    with pytest.raises(InputError, match="learning_rate must be > 0"):
        parsed("--learning-rate", "0")
