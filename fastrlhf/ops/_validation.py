"""Input checks shared by the ops. Each raises ValueError naming the argument and what is wrong."""

from __future__ import annotations

import math

import torch

from fastrlhf._extension import extension

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def checks_values() -> bool:
    """Whether the checks that read tensor values (a mask's 0/1, finite scores, a count) run here.

    They run eagerly, and are skipped while torch.compile traces: a graph cannot branch on values held
    on the device (fullgraph=True refuses it outright). The C++ and CUDA ops check inside the op, where
    compiled graphs keep the checks; the torch and Triton paths of a compiled graph go without them.
    """
    return not torch.compiler.is_compiling()


def check_tensor(name: str, value, dtypes=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(
            f"{name} has dtype {str(value.dtype).replace('torch.', '')}; expected one of {allowed}"
        )
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(devices))


def check_positive_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_labels_in_range(
    labels: torch.Tensor, vocab_size: int, ignore_index: int, name: str = "labels"
) -> None:
    """Every label is ``ignore_index`` or in ``[0, vocab_size)``. One reduction; syncs on CUDA."""
    if labels.numel() == 0:
        return
    if name == "labels" and labels.is_cpu:
        compiled = extension()
        if compiled is not None:  # the same check and words as one C++ loop: ~1 µs, not four torch ops
            compiled.check_labels_in_range(labels, int(vocab_size), int(ignore_index))
            return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        count = int(bad.sum())
        raise ValueError(
            f"{name} has {count} value(s) outside [0, {vocab_size}) that are not ignore_index={ignore_index} "
            f"(first: {first})"
        )


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(reference.shape):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {reference_name} has {tuple(reference.shape)}; "
                "they must match"
            )


def check_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of any numeric or bool dtype → uint8. Values other than 0 and 1 are an error.

    Bool masks need no check; integer masks take one min/max pass; floating masks an exact 0/1 test.
    """
    check_tensor(name, mask)
    if mask.dtype == torch.bool:
        # Eagerly a free reinterpretation of the bytes. Traced, a cast instead: inductor fuses it into its
        # consumer, while torch 2.11's inductor cannot lower a bool -> uint8 view (an H200 run failed so).
        return mask.to(torch.uint8) if torch.compiler.is_compiling() else mask.view(torch.uint8)
    if mask.is_complex():
        raise ValueError(
            f"{name} must be bool or a real 0/1 tensor, got {str(mask.dtype).replace('torch.', '')}"
        )
    if mask.numel() and checks_values():
        if mask.is_floating_point():
            bad = bool(((mask != 0) & (mask != 1)).any())
        else:
            low, high = torch.aminmax(mask)
            bad = bool(low < 0) or bool(high > 1)
        if bad:
            first = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
            raise ValueError(f"{name} must hold only 0 and 1 (it is a mask), found {first}")
    return mask.to(torch.uint8)
