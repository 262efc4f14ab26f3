"""Loads the compiled core ``fastrlhf._C`` once, and remembers why it is missing if it is."""

from __future__ import annotations

import functools
import warnings


@functools.cache
def load_extension():
    """Return ``(module, None)`` when ``fastrlhf._C`` imports, else ``(None, reason)``.

    The warning is issued once per process: the torch backend then serves every CPU op.
    """
    try:
        import torch  # noqa: F401  (the extension links against libtorch, which must be loaded first)

        from fastrlhf import _C
    except ImportError as exc:
        reason = (
            f"fastrlhf._C could not be imported ({exc}); reinstall with `pip install --no-build-isolation .`"
        )
        warnings.warn(
            f"{reason}. Falling back to the torch backend for CPU ops.", RuntimeWarning, stacklevel=3
        )
        return None, reason
    return _C, None


def extension():
    """The compiled module, or None."""
    return load_extension()[0]
