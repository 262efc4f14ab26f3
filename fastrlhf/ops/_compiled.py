"""The op wrappers' calls of their TORCH_LIBRARY ops (``torch.ops.fastrlhf.<name>``), at the least cost.

In eager mode a call goes through the extension's typed entry of the op, ``fastrlhf._C.<name>``
(csrc/direct_calls.cpp): the same dispatcher call as ``torch.ops``, so autograd, fake tensors and dispatch
modes see the same op, without torch's parsing of each Python argument against the schema (~1 µs per
argument on a 2-core EPYC; a third of ``compute_advantages``' 12-argument call). While torch.compile traces,
the call goes through ``torch.ops``: dynamo knows an ``OpOverload``, not a pybind11 function.

The typed entry raises ``TypeError`` for an argument of a type the schema does not take (a str for a
float, say); a wrapper catches it and takes its Python path, whose checks name the argument and what is
wrong with it.
"""

from __future__ import annotations

import torch

from fastrlhf._extension import extension


class CompiledOp:
    """``CompiledOp("gae")(*args)`` runs ``torch.ops.fastrlhf.gae(*args)``, by the cheapest route that is
    exact. Create one per op at import; the extension is looked up at the first call (an op only calls it
    once ``runs_compiled_op`` has found the extension loaded)."""

    __slots__ = ("name", "_direct")

    def __init__(self, name: str):
        self.name = name
        self._direct = None

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return getattr(torch.ops.fastrlhf, self.name)(*args)
        direct = self._direct
        if direct is None:
            direct = self._direct = getattr(extension(), self.name)
        return direct(*args)

    def __repr__(self) -> str:
        return f"CompiledOp({self.name!r})"
