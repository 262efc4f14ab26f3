"""The one place that swaps a peer trainer's functions for fastrlhf's and swaps them back.

A peer binds a function in several places: its defining module, every module that did
``from ... import name`` before we patched, and registries (dicts) that decorators filled at import time
(veRL's ``ADV_ESTIMATOR_REGISTRY``). Replacing only the defining module's attribute would leave the
others calling the old code, so ``apply`` swaps the attribute and then every binding of the same object
in the peer's loaded modules. Modules imported *after* the patch copy the patched attribute by
themselves; ``PatchHandle.unpatch`` finds those too and restores them.

A peer that is not installed (or whose modules fail to import) gets one warning and an empty handle:
``patch()`` never raises for a missing peer, so the same script runs with or without it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType

_LOCK = threading.Lock()
# peer name -> handles applied and not yet undone, oldest first (module-level ``unpatch()`` undoes them).
_ACTIVE: dict[str, list[PatchHandle]] = {}


@dataclasses.dataclass(frozen=True)
class Target:
    """One thing to replace: ``module:attr``.

    ``attr`` is a module attribute (``"selective_log_softmax"``), a class attribute (``"Cls.method"``), or
    ``"*.method"``: that method on every class *defined* in ``module`` that defines it itself (so version
    renames such as NaiveExperienceMaker → RemoteExperienceMaker need no list). ``optional`` targets may
    be absent in some versions of the peer and are skipped quietly.
    """

    module: str
    attr: str
    replacement: Callable
    optional: bool = False


@dataclasses.dataclass
class _Swap:
    owner: object  # a module, a class or a dict
    key: str
    original: object
    replacement: object

    def _get(self):
        if isinstance(self.owner, dict):
            return self.owner.get(self.key)
        return (
            self.owner.__dict__.get(self.key)
            if inspect.isclass(self.owner)
            else getattr(self.owner, self.key)
        )

    def _set(self, value) -> None:
        if isinstance(self.owner, dict):
            self.owner[self.key] = value
        else:
            setattr(self.owner, self.key, value)

    def where(self) -> str:
        if isinstance(self.owner, dict):
            return f"<registry>[{self.key!r}]"
        return (
            f"{getattr(self.owner, '__qualname__', getattr(self.owner, '__name__', self.owner))}.{self.key}"
        )


class PatchHandle:
    """What one ``patch()`` call changed. ``unpatch()`` restores it; also a context manager.

    ``patched`` lists the places swapped (``"module.attr"``); empty when the peer is not installed.
    """

    def __init__(self, peer: str, root: str, swaps: list[_Swap]):
        self.peer = peer
        self._root = root
        self._swaps = swaps
        self._active = True

    @property
    def patched(self) -> list[str]:
        return [swap.where() for swap in self._swaps]

    @property
    def active(self) -> bool:
        """True until ``unpatch()``; False from the start when nothing was patched."""
        return self._active and bool(self._swaps)

    def unpatch(self) -> None:
        """Put every original back. Safe to call twice. A place that someone else re-patched since is
        left alone (with a warning) rather than clobbered."""
        with _LOCK:
            if not self._active:
                return
            self._active = False
            handles = _ACTIVE.get(self.peer, [])
            if self in handles:
                handles.remove(self)
            skipped = []
            for swap in reversed(self._swaps):
                if swap._get() is swap.replacement:
                    swap._set(swap.original)
                else:
                    skipped.append(swap.where())
            # Modules imported while the patch was on copied our function under the peer's name.
            originals = {id(s.replacement): s.original for s in self._swaps if not inspect.isclass(s.owner)}
            for module in _peer_modules(self._root):
                for name, value in list(vars(module).items()):
                    if id(value) in originals and _is_ours(value):
                        setattr(module, name, originals[id(value)])
        if skipped:
            warnings.warn(
                f"fastrlhf.compat.{self.peer}: left {', '.join(skipped)} as found (replaced again since)",
                RuntimeWarning,
                stacklevel=2,
            )

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"PatchHandle({self.peer}, {state}, {len(self._swaps)} swaps)"


def _is_ours(value) -> bool:
    return getattr(value, "__module__", "").startswith("fastrlhf.compat")


def _peer_modules(root: str) -> Iterator[ModuleType]:
    for name, module in list(sys.modules.items()):
        if isinstance(module, ModuleType) and (name == root or name.startswith(root + ".")):
            yield module


def _installed(root: str) -> bool:
    # A module already in sys.modules may have no __spec__ (tests inject stand-ins), so look there first.
    return root in sys.modules or importlib.util.find_spec(root) is not None


def _resolve(target: Target) -> list[tuple[object, str]]:
    """(owner, key) pairs ``target`` names in its imported module; [] when the attribute is absent."""
    module = importlib.import_module(target.module)
    if target.attr.startswith("*."):
        method = target.attr[2:]
        return [
            (cls, method)
            for cls in vars(module).values()
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and method in cls.__dict__
        ]
    owner: object = module
    *path, key = target.attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return []
    present = key in owner.__dict__ if inspect.isclass(owner) else hasattr(owner, key)
    return [(owner, key)] if present else []


def apply(peer: str, root: str, targets: list[Target]) -> PatchHandle:
    """Swap every target of ``peer`` (top-level package ``root``) and each binding of the same objects.

    Returns the handle that undoes it. Warns once, and patches nothing, when ``root`` is not installed;
    warns once listing the targets it could not reach (module import error, required attribute
    missing) and patches the rest.
    """
    if not _installed(root):
        warnings.warn(
            f"fastrlhf.compat.{peer}.patch(): {root!r} is not installed, nothing was patched",
            RuntimeWarning,
            stacklevel=3,
        )
        return PatchHandle(peer, root, [])

    with _LOCK:
        swaps: list[_Swap] = []
        problems: list[str] = []
        for target in targets:
            try:
                places = _resolve(target)
            except Exception as exc:  # a peer module can fail on its own heavy imports (ray, vllm, ...)
                problems.append(f"{target.module} ({type(exc).__name__}: {exc})")
                continue
            if not places and not target.optional:
                problems.append(f"{target.module}.{target.attr} (not found)")
            for owner, key in places:
                swap = _Swap(owner, key, None, target.replacement)
                current = swap._get()
                if current is target.replacement:
                    continue  # already patched by an earlier handle, which will undo it
                swap.original = current
                swap._set(target.replacement)
                swaps.append(swap)

        # Other bindings of the same objects: ``from x import f`` copies and registry dict entries.
        by_original = {id(s.original): s for s in swaps if not inspect.isclass(s.owner)}
        for module in _peer_modules(root):
            for name, value in list(vars(module).items()):
                if id(value) in by_original and value is by_original[id(value)].original:
                    swap = _Swap(module, name, value, by_original[id(value)].replacement)
                    if not any(s.owner is module and s.key == name for s in swaps):
                        swap._set(swap.replacement)
                        swaps.append(swap)
                elif isinstance(value, dict) and name != "__builtins__":
                    for key, item in list(value.items()):
                        if id(item) in by_original and item is by_original[id(item)].original:
                            swap = _Swap(value, key, item, by_original[id(item)].replacement)
                            swap._set(swap.replacement)
                            swaps.append(swap)

        handle = PatchHandle(peer, root, swaps)
        if swaps:
            _ACTIVE.setdefault(peer, []).append(handle)
    if problems:
        warnings.warn(
            f"fastrlhf.compat.{peer}.patch(): could not patch {'; '.join(problems)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return handle


def unpatch_all(peer: str) -> None:
    """Undo every still-active ``patch()`` of ``peer``, newest first."""
    with _LOCK:
        handles = list(_ACTIVE.get(peer, []))
    for handle in reversed(handles):
        handle.unpatch()
