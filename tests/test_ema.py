"""WeightEMA, the policy's moving average, against a float64 restatement of its definition; the swap for
the final save; its checkpoint. Its sharded (FSDP2) path runs in the two-process PPO launch test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fastrlhf.train.ema import WeightEMA


def small_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # a frozen weight: its average is itself, so it is not kept
    return model


def perturb(model: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 3.0)


def test_average_matches_the_float64_definition_and_leaves_frozen_weights_out():
    torch.manual_seed(0)
    model, decay = small_model(), 0.83
    ema = WeightEMA(model, decay)
    assert set(ema.average) == {"0.weight", "2.weight", "2.bias"}
    generator = torch.Generator().manual_seed(1)
    reference = None
    for _ in range(9):
        perturb(model, generator)
        ema.update(model)
        weights = {name: p.detach().double() for name, p in model.named_parameters() if p.requires_grad}
        # The first update copies the weights; each later one is decay * average + (1 - decay) * weight.
        if reference is None:
            reference = {name: w.clone() for name, w in weights.items()}
        else:
            reference = {name: decay * reference[name] + (1 - decay) * weights[name] for name in weights}
    assert ema.updates == 9
    for name, average in ema.average.items():
        torch.testing.assert_close(average.double(), reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_swapped_into_puts_the_averages_in_and_restores_the_weights_exactly():
    torch.manual_seed(0)
    model = small_model()
    ema = WeightEMA(model, 0.5)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        perturb(model, generator)
        ema.update(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with ema.swapped_into(model):
        for name, parameter in model.named_parameters():
            expected = ema.average[name] if name in ema.average else before[name]
            assert torch.equal(parameter.detach(), expected), name
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    ema = WeightEMA(model, 0.9)
    perturb(model, torch.Generator().manual_seed(3))
    ema.update(model)
    ema.update(model)
    main = SimpleNamespace(is_main_process=True)
    ema.save_checkpoint(tmp_path / "ema", main)
    assert (tmp_path / "ema.safetensors").is_file()

    restored = WeightEMA(small_model(), 0.9)
    restored.load_checkpoint(tmp_path / "ema")
    assert restored.updates == 2
    for name, average in ema.average.items():
        assert torch.equal(restored.average[name], average), name

    other = WeightEMA(nn.Linear(5, 7), 0.9)
    with pytest.raises(ValueError, match="other parameters"):
        other.load_checkpoint(tmp_path / "ema")
    with pytest.raises(FileNotFoundError, match="no EMA of the policy"):
        restored.load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, 1.0)
