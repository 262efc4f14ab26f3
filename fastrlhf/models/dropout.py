"""Dropout overrides: InstructGPT's SFT used residual dropout 0.2, which most configs leave at 0.

Models whose config has dropout fields (GPT-2's ``resid_pdrop``, Llama's ``attention_dropout``, ...) get
them set. Llama-family blocks have no residual dropout at all, so there it is added as a forward hook on
each residual branch's output projection (``o_proj`` and ``down_proj``): the branch output is dropped
before it is added to the residual stream, which is what residual dropout means. The hooks follow
``module.training``, so ``model.eval()`` switches them off (rollouts must run without dropout).
"""

from __future__ import annotations

from torch import nn

# Config fields that mean residual / hidden dropout, and attention-probability dropout, across HF families.
RESIDUAL_FIELDS = ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob", "residual_dropout", "dropout")
ATTENTION_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
EMBEDDING_FIELDS = ("embd_pdrop", "embed_dropout")
# Output projections of the attention and MLP branches in Llama-style blocks (Llama, Mistral, Qwen2, ...).
BRANCH_OUTPUT_NAMES = ("o_proj", "down_proj")


def _is_rate(value) -> bool:
    # config.json files write a zero rate as 0 as often as 0.0; bool is an int but never a rate
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dropout_hook(p: float):
    def hook(module: nn.Module, _inputs, output):
        return nn.functional.dropout(output, p=p, training=module.training)

    return hook


def apply_dropout(model: nn.Module, p: float) -> dict:
    """Set residual and attention dropout to ``p`` on an HF model; returns what was changed.

    Call it after LoRA is applied (so the hooks sit on the adapted projections). Returns
    ``{"config_fields": [...], "branch_hooks": n}`` so the trainer can log how the dropout was applied.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    config = model.config
    changed = []
    for name in RESIDUAL_FIELDS + ATTENTION_FIELDS + EMBEDDING_FIELDS:
        if _is_rate(getattr(config, name, None)):
            setattr(config, name, p)
            changed.append(name)
    # Modules built from the config copied the old rate; nn.Dropout layers must be updated in place.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        # Llama-style attention reads its rate from an attribute at call time.
        if _is_rate(getattr(module, "attention_dropout", None)):
            module.attention_dropout = p
    has_residual_field = any(name in changed for name in RESIDUAL_FIELDS)
    hooks = 0
    if not has_residual_field and p > 0:
        for name, module in model.named_modules():
            # By name, not type: under LoRA the projection is peft's wrapper, whose output includes the
            # adapter's delta, and that whole branch output is what must be dropped.
            if name.rsplit(".", 1)[-1] in BRANCH_OUTPUT_NAMES:
                module.register_forward_hook(_dropout_hook(p))
                hooks += 1
    return {"config_fields": changed, "branch_hooks": hooks}
