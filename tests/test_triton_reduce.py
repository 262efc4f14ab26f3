"""ops/triton/reduce.py's mean_of_sums, the reduction epilogue the Triton KL and ranking kernels share: the
sums of per-segment partials, over several of its loop steps, against float64 on the CPU."""

import pytest
import torch
from conftest import on_device, triton_targets


@pytest.mark.parametrize("backend,device", triton_targets())
@pytest.mark.parametrize("segments", [0, 1, 5, 2500])  # 2500: three steps of its 1024-segment loop
def test_mean_of_counted_sums(backend, device, segments):
    from fastrlhf.ops.triton.reduce import mean_of_sums

    counts = torch.randint(0, 40, (segments,), dtype=torch.int32)
    counts[::7] = 0
    sums = torch.randn(segments) * counts  # a segment without tokens sums to 0
    a, c = on_device(device, sums, counts)
    mean, second, normalizer, empty = mean_of_sums(a, c, count_empty=True)
    total = max(int(counts.sum()), 1)
    assert second is None
    assert normalizer.dtype == torch.float32 and normalizer.item() == total
    assert empty.dtype == torch.int64 and empty.item() == int((counts == 0).sum())
    torch.testing.assert_close(mean.cpu().double(), sums.double().sum() / total, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", triton_targets())
@pytest.mark.parametrize("segments", [0, 3, 2500])
def test_mean_over_segments_with_a_positive_count(backend, device, segments):
    """``indicator``: the ranking loss's mean over the prompts that have a pair (count > 0), two means over
    the same weights, and the empty ones counted."""
    from fastrlhf.ops.triton.reduce import mean_of_sums

    pairs = torch.randint(0, 6, (segments,)).float()
    loss = torch.rand(segments) * (pairs > 0)
    accuracy = torch.rand(segments) * (pairs > 0)
    a, p, b = on_device(device, loss, pairs, accuracy)
    mean_loss, mean_accuracy, normalizer, empty = mean_of_sums(a, p, b, indicator=True, count_empty=True)
    with_pairs = max(int((pairs > 0).sum()), 1)
    assert normalizer.item() == with_pairs and empty.item() == int((pairs == 0).sum())
    torch.testing.assert_close(
        mean_loss.cpu().double(), loss.double().sum() / with_pairs, rtol=2e-6, atol=1e-7
    )
    torch.testing.assert_close(
        mean_accuracy.cpu().double(), accuracy.double().sum() / with_pairs, rtol=2e-6, atol=1e-7
    )
