"""Large CPU outputs of the C++ ops come from huge-page memory (csrc/output_alloc.h): from 32 MiB up they
take another allocator than at::empty. These tests hold the ops' values and gradients to float64 on
both sides of that threshold, and check that such an output behaves as any tensor (resized, grown in
place, accumulated into, freed)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import cpu_backends
from numerics import assert_close_fp32

from fastrlhf.ops import gather_logprobs, kl_penalty, reference

HUGE_PAGE_OUTPUT_BYTES = 32 << 20
CPP = [p for p in cpu_backends(include_torch=False) if p.id == "cpp"]


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("rows", [511, 512])  # 511 x 16411 fp32 is below 32 MiB, 512 x 16411 above
def test_gather_logprobs_gradient_either_side_of_the_threshold(backend, rows):
    vocab = 16411
    logits = torch.randn(rows, vocab) * 4
    labels = torch.randint(0, vocab, (rows,))
    labels[::5] = -100
    grad_out = torch.randn(rows)
    x = logits.clone().requires_grad_(True)
    (gather_logprobs(x, labels, temperature=0.8, backend=backend) * grad_out).sum().backward()
    x64 = logits.double().requires_grad_(True)
    (reference.gather_logprobs(x64, labels, 0.8) * grad_out.double()).sum().backward()
    assert (x.grad.numel() * 4 >= HUGE_PAGE_OUTPUT_BYTES) == (rows == 512)
    assert_close_fp32("d logits", x.grad, x64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", CPP)
def test_kl_penalty_large_outputs_match_float64(backend):
    shape = (513, 16411)  # 32.1 MiB per fp32 output: the estimate and both gradients
    logprobs = -torch.rand(shape) * 6
    ref = logprobs + torch.randn(shape) * 0.7
    mask = torch.rand(shape) > 0.2
    grad_out = torch.randn(shape)
    x, y = logprobs.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    kl = kl_penalty(x, y, mask, "k3", backend=backend)
    (kl * grad_out).sum().backward()
    x64, y64 = logprobs.double().requires_grad_(True), ref.double().requires_grad_(True)
    kl64 = reference.kl_penalty(x64, y64, mask, "k3")
    (kl64 * grad_out.double()).sum().backward()
    assert_close_fp32("kl", kl, kl64)
    assert_close_fp32("d logprobs", x.grad, x64.grad)
    assert_close_fp32("d ref_logprobs", y.grad, y64.grad)


@pytest.mark.parametrize("backend", CPP)
def test_a_huge_page_gradient_is_an_ordinary_tensor(backend):
    rows, vocab = 520, 16411
    logits = torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    x = logits.clone().requires_grad_(True)
    gather_logprobs(x, labels, backend=backend).sum().backward()
    first = x.grad.clone()
    gather_logprobs(x, labels, backend=backend).sum().backward()  # accumulates into the first gradient
    torch.testing.assert_close(x.grad, 2 * first)
    grad = x.grad
    grad.resize_(rows + 8, vocab)  # grows its storage through the allocator that made it
    grad[rows:] = 1.5
    assert torch.equal(grad[:rows], 2 * first) and bool((grad[rows:] == 1.5).all())
    del grad, x, first
    gc.collect()
