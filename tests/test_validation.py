"""Bad input raises a ValueError that names the argument and what is wrong."""

import math

import pytest
import torch
from conftest import cpu_backends

from fastrlhf.ops import gather_logprobs
from fastrlhf.ops._validation import check_labels_in_range


@pytest.mark.parametrize("backend", cpu_backends())
def test_shape_mismatch(backend):
    with pytest.raises(ValueError, match=r"labels has shape \(4,\).*\(3,\)"):
        gather_logprobs(torch.randn(3, 10), torch.zeros(4, dtype=torch.long), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bad_label", [10, -5, 1_000_000])
def test_labels_out_of_range(backend, bad_label):
    labels = torch.tensor([0, bad_label, -100])
    with pytest.raises(ValueError, match=rf"labels has 1 value\(s\) outside \[0, 10\).*first: {bad_label}"):
        gather_logprobs(torch.randn(3, 10), labels, backend=backend)


def test_wrong_dtypes():
    with pytest.raises(ValueError, match="logits has dtype int64"):
        gather_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has dtype float32"):
        gather_logprobs(torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="logits must be a torch.Tensor"):
        gather_logprobs([[0.0, 1.0]], torch.zeros(1, dtype=torch.long))


def test_mixed_devices():
    with pytest.raises(ValueError, match="one device.*logits on cpu.*labels on meta"):
        gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)


def test_empty_vocab_and_scalar():
    with pytest.raises(ValueError, match="empty vocabulary"):
        gather_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        gather_logprobs(torch.tensor(1.0), torch.tensor(0))


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend='fast' is not one of"):
        gather_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend="fast")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_the_compiled_label_check_reads_as_the_torch_one(dtype):
    """On CPU tensors the label range check is one C++ loop; its message (count, first bad label in
    row-major order) is the torch composition's, word for word."""
    from fastrlhf._extension import extension

    module = extension()
    if module is None:
        pytest.skip("the compiled extension is not built")
    labels = torch.tensor([[3, 0, 200], [7, 9, 101]]).to(dtype)
    vocab, ignore_index = 9, 7

    def torch_message():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        first, count = labels[bad].flatten()[0].item(), int(bad.sum())
        return (
            f"labels has {count} value(s) outside [0, {vocab}) that are not ignore_index={ignore_index} "
            f"(first: {first})"
        )

    with pytest.raises(ValueError) as info:
        check_labels_in_range(labels, vocab, ignore_index)
    assert str(info.value) == torch_message() == module_message(module, labels, vocab, ignore_index)
    check_labels_in_range(labels.clamp(max=8), vocab, ignore_index)  # all in range: no error


def module_message(module, labels, vocab, ignore_index) -> str:
    with pytest.raises(ValueError) as info:
        module.check_labels_in_range(labels, vocab, ignore_index)
    return str(info.value)
