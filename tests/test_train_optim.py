"""fastrlhf.train.optim: the optimizers (and the default's choice), parameter groups and the warmup +
cosine schedule."""

import io
import logging
import math
import warnings

import pytest
import torch
from torch import nn

from fastrlhf.train.optim import OPTIMIZER_NAMES, build_optimizer, build_scheduler, param_groups

# bitsandbytes quantises a tensor's Adam state only from this many elements (its min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096


def test_default_is_8bit_adamw_on_a_gpu_and_torch_adamw_on_cpu(monkeypatch):
    import bitsandbytes as bnb

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert type(build_optimizer([nn.Parameter(torch.randn(4))], lr=1e-3)) is torch.optim.AdamW
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # bitsandbytes' optimizer runs on CPU tensors too, so the GPU choice can be built here.
    assert isinstance(build_optimizer([nn.Parameter(torch.randn(4))], lr=1e-3), bnb.optim.AdamW8bit)


def test_adamw8bit_keeps_8bit_state():
    import bitsandbytes as bnb

    weight = nn.Parameter(torch.randn(64, 128))  # 8192 elements: large enough to be quantised
    optimizer = build_optimizer([weight], "adamw8bit", lr=1e-3)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].shape == weight.shape
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def _quadratic_problem():
    """Least squares ``||A w - b||^2`` with a weight matrix big enough for bitsandbytes' 8-bit path."""
    a = torch.randn(256, BNB_MIN_8BIT_SIZE // 64) / 8
    w_true = torch.randn(BNB_MIN_8BIT_SIZE // 64, 64)
    b = a @ w_true
    weight = nn.Parameter(torch.zeros_like(w_true))
    return weight, lambda: ((a @ weight - b) ** 2).mean()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_each_optimizer_reduces_a_quadratic_loss(name):
    weight, loss_fn = _quadratic_problem()
    optimizer = build_optimizer([weight], name, lr=0.05)
    initial = loss_fn().item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss_fn().item() < 0.05 * initial


def test_paged_on_cpu_logs_one_clear_line_instead_of_a_warning_mid_loop(caplog):
    weight, loss_fn = _quadratic_problem()
    with caplog.at_level(logging.INFO, logger="fastrlhf.train.optim"):
        optimizer = build_optimizer([weight], "paged_adamw8bit", lr=1e-3)
    if torch.cuda.is_available():
        pytest.skip("paging applies with CUDA; the CPU fallback message is not expected")
    assert [r.getMessage() for r in caplog.records if "paged_adamw8bit" in r.getMessage()] == [
        "paged_adamw8bit: no CUDA device, so optimizer state stays in ordinary CPU memory "
        "(paging needs CUDA unified memory); this behaves exactly like adamw8bit"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' own fallback warning would fail the step
        loss_fn().backward()
        optimizer.step()
    assert optimizer.state[weight]["state1"].dtype == torch.uint8


def test_unknown_name_lists_the_choices():
    with pytest.raises(
        ValueError, match="unknown name 'sgd'; choose one of auto, adamw8bit, paged_adamw8bit, adamw"
    ):
        build_optimizer([nn.Parameter(torch.zeros(2))], "sgd", lr=1e-3)


def test_missing_bitsandbytes_suggests_torch_adamw(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(RuntimeError, match="--optimizer adamw"):
        build_optimizer([nn.Parameter(torch.zeros(2))], "adamw8bit", lr=1e-3)
    # torch's AdamW needs nothing from bitsandbytes
    assert isinstance(build_optimizer([nn.Parameter(torch.zeros(2))], "adamw", lr=1e-3), torch.optim.AdamW)


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as in many LMs: must appear once


def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = TinyBlock()
    groups = param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[0] == {id(model.embed.weight), id(model.proj.weight)}
    assert ids[1] == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    assert all(len(g["params"]) == len(set(map(id, g["params"]))) for g in groups)

    optimizer = build_optimizer(groups, "adamw", lr=1e-3, weight_decay=0.5)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # groups keep their own


def test_param_groups_drops_empty_groups_and_rejects_all_frozen():
    only_norm = nn.LayerNorm(3)
    only_norm.weight.requires_grad_(False)
    groups = param_groups(only_norm, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["params"] == [only_norm.bias]
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False), weight_decay=0.1)


def _expected_multiplier(step: int, total: int, warmup: int, final: float) -> float:
    """InstructGPT's schedule written out independently: linear warmup, cosine to ``final``."""
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_schedule_warmup_peak_and_cosine_to_ten_percent(warmup):
    peak, total = 3e-4, 40
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_scheduler(optimizer, total_steps=total, warmup_steps=warmup)
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    expected = [peak * _expected_multiplier(s, total, warmup, 0.1) for s in range(total + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert lrs[warmup] == pytest.approx(peak)  # the peak is reached exactly when warmup ends
    assert max(lrs) == pytest.approx(peak)
    assert lrs[total] == pytest.approx(0.1 * peak)
    ramp, decay = lrs[: warmup + 1], lrs[warmup:]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    if warmup:
        assert lrs[0] == 0.0


def test_schedule_final_fraction_is_configurable():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, total_steps=5, final_lr_fraction=0.0)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 0}, "total_steps must be >= 1"),
        ({"total_steps": 5, "warmup_steps": 6}, "warmup_steps must be in"),
        ({"total_steps": 5, "final_lr_fraction": 1.5}, "final_lr_fraction must be in"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        build_scheduler(optimizer, **kwargs)


@pytest.mark.parametrize(
    "warmup, total, final", [(0, 1, 0.1), (3, 3, 0.1), (7, 40, 0.1), (2, 17, 0.0), (5, 9, 1.0)]
)
def test_schedule_equals_transformers_up_to_the_last_step_and_stays_at_the_floor_after(warmup, total, final):
    """transformers' own warmup + cosine-to-a-floor schedule is the reference up to ``total``; past it,
    where transformers' cosine climbs back up, ours stays at the floor."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    ours_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-4)
    theirs_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-4)
    ours = build_scheduler(ours_opt, total_steps=total, warmup_steps=warmup, final_lr_fraction=final)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        theirs_opt, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=final
    )
    for step in range(total + 5):
        ours_lr, theirs_lr = ours_opt.param_groups[0]["lr"], theirs_opt.param_groups[0]["lr"]
        if step <= total:
            assert ours_lr == pytest.approx(theirs_lr, rel=1e-12, abs=1e-18), step
        else:
            assert ours_lr == pytest.approx(final * 2e-4, rel=1e-12, abs=1e-18), step
        for optimizer, scheduler in ((ours_opt, ours), (theirs_opt, theirs)):
            optimizer.step()
            scheduler.step()
    # The state a checkpoint stores round-trips through torch.save.
    state = ours.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
