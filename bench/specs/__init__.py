"""The bench spec of every op, by name (see ``_base`` for what a spec provides)."""

from specs import (
    compute_advantages,
    gae,
    gather_logprobs,
    group_advantages,
    kl_penalty,
    linear_logprobs,
    ppo_logprob_loss,
    ppo_policy_loss,
    ranking_loss,
    sample,
)

SPECS = {
    spec.OP: spec
    for spec in (
        gather_logprobs,
        linear_logprobs,
        ppo_policy_loss,
        ppo_logprob_loss,
        kl_penalty,
        gae,
        compute_advantages,
        group_advantages,
        ranking_loss,
        sample,
    )
}
