"""fastrlhf.train: the SFT, reward-model and PPO loops and what they share.

Shared building blocks, one small module each: ``config`` (dataclass flags and YAML), ``optim``
(optimizers, parameter groups, the LR schedule), ``checkpoint`` (atomic, resumable accelerate state),
``io`` (atomic file writes), ``metrics`` (``metrics.jsonl`` and ``summary.json``) and ``plots``.
"""
