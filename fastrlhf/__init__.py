"""fastrlhf: a performance-first RLHF trainer with fused kernels.

``fastrlhf.ops`` is imported on first use, not by ``import fastrlhf``: the command line's help, the data
tools and the config parser then start without torch (about 2 s, and 5 s with what ``ops`` pulls in, on a
2-core CPU). ``fastrlhf.ops`` never needs the compiled extension: without it, a warning is issued once
and the plain-torch backend serves every op.
"""

import importlib

from fastrlhf._version import __version__

__all__ = ["ops", "__version__"]


def __getattr__(name: str):
    # PEP 562: ``fastrlhf.ops`` after a bare ``import fastrlhf`` imports the subpackage then.
    if name == "ops":
        return importlib.import_module("fastrlhf.ops")
    raise AttributeError(f"module 'fastrlhf' has no attribute {name!r}")
