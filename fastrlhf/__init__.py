"""fastrlhf: a performance-first RLHF trainer with fused kernels.

``import fastrlhf`` never needs the compiled extension: without it, a warning is issued once and the
plain-torch backend serves every op.
"""

from fastrlhf import ops
from fastrlhf._version import __version__

__all__ = ["ops", "__version__"]
