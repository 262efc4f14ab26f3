"""Drop-in fastrlhf kernels for trainers people already run: TRL, veRL and OpenRLHF.

Each submodule offers the peer's own function names and signatures as thin adapters over
``fastrlhf.ops``, and a ``patch()`` that swaps them into the installed peer (reversibly)::

    import fastrlhf.compat.trl
    handle = fastrlhf.compat.trl.patch()   # or: with fastrlhf.compat.trl.patch(): trainer.train()
    ...
    handle.unpatch()

- ``fastrlhf.compat.trl``: ``selective_log_softmax``, ``selective_log_softmax_and_entropy``,
  ``entropy_from_logits``.
- ``fastrlhf.compat.verl``: ``logprobs_from_logits``, ``compute_gae_advantage_return``, ``kl_penalty``,
  ``kl_penalty_forward``, and the outcome estimators ``compute_grpo_outcome_advantage``,
  ``compute_rloo_outcome_advantage``, ``compute_reinforce_plus_plus_outcome_advantage``,
  ``compute_reinforce_plus_plus_baseline_outcome_advantage``.
- ``fastrlhf.compat.openrlhf``: ``log_probs_from_logits``, ``compute_approx_kl``,
  ``get_advantages_and_returns``, ``PairWiseLoss``, ``LogExpLoss``.

Importing a submodule never imports the peer; ``patch()`` does, and only warns when it is missing.
Each module's docstring lists where its results differ from the peer's, and why.
"""

PEERS = ("trl", "verl", "openrlhf")

__all__ = ["PEERS"]
