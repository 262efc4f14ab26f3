"""The KL coefficient β of the per-token penalty: fixed, or adapted toward a target KL.

The adaptive rule is Ziegler et al. (2019), which InstructGPT's PPO setup inherits: the coefficient moves
by at most ±20% of ``n_steps / horizon`` per update, in the direction that brings the observed KL back to
the target.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class KLController:
    """``value`` is the current β; ``update(kl, n_steps)`` adapts it when ``target`` is set."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self):
        if not self.value >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.value}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"target_kl must be > 0, got {self.target}")
        if self.horizon < 1:
            raise ValueError(f"kl_horizon must be >= 1, got {self.horizon}")

    def update(self, kl: float, n_steps: int) -> float:
        """Adapt β after a rollout whose mean per-sequence KL was ``kl`` over ``n_steps`` samples."""
        if self.target is not None:
            # Proportional control, clipped so that one noisy batch cannot swing β by more than 20%.
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
