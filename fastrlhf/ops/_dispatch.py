"""How the ops call their kernel entry points: through the custom op when compiled, directly in eager.

Every kernel entry point is a ``torch.library`` custom op (schema, fake impl, autograd formula): that is
what ``torch.compile``, ``opcheck`` and tensor subclasses (FakeTensor, DTensor) need. Called eagerly,
the custom op's Python layers (dispatch, the generated autograd function, the redispatch below
autograd) cost about 60 µs a call on a 2-core EPYC, several times the kernel itself on small inputs.
``kernel_op`` keeps the custom op for those cases and otherwise calls the implementation directly,
wrapped, when a gradient is needed, in an ``autograd.Function`` built from the same ``setup_context``
and ``backward`` that are registered with the custom op: both paths run the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class KernelOp:
    """A custom op with an eager fast path. Call it like the op; ``register_fake`` and
    ``register_autograd`` are the custom op's (use them once, at import)."""

    def __init__(self, name: str, impl: Callable, mutates_args: Iterable[str]):
        self.impl = impl
        self.custom_op = torch.library.custom_op(name, impl, mutates_args=tuple(mutates_args))
        namespace, opname = name.split("::")
        self.overload = getattr(getattr(torch.ops, namespace), opname).default
        self.function: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        return self.custom_op.register_fake(fake)

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        torch.library.register_autograd(self.custom_op, backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *args):
            output = impl(*args)
            setup_context(ctx, args, output)
            return output

        self.function = type(
            f"Eager{self.overload.__name__}",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward)},
        )

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.compiler.is_compiling() or any(type(t) not in _PLAIN_TENSORS for t in tensors):
            return self.overload(*args)
        if self.function is not None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.function.apply(*args)
        return self.impl(*args)


def kernel_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``fn`` becomes the custom op ``name`` with an eager fast path (see the module doc)."""

    def wrap(fn: Callable) -> KernelOp:
        return KernelOp(name, fn, mutates_args)

    return wrap
