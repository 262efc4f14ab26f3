"""PPO's clipped policy loss, from log-probs or fused with the hidden × lm_head product.

``ppo_policy_loss`` takes ready-made log-probs. On the cpp and cuda backends it is the TORCH_LIBRARY op
``torch.ops.fastrlhf.ppo_policy_loss`` (csrc/ppo_loss_op.cpp): one pass over the tokens sums each row's
loss and stats, the aggregation (token-mean or seq-mean-token-mean) and the stats' means are its
epilogue, and the gradient is one more elementwise pass, all in C++. The torch backend is the reference
(``reference.ppo_token_losses``), and takes float64.

``linear_ppo_policy_loss`` takes the last hidden states and the lm_head instead and never holds the
``[N, V]`` logits. Because the loss is a scalar whose per-token derivative is known as soon as a
chunk's log-probs are, the gradient is computed during the forward pass (as Liger's fused linear
losses do): per chunk, one GEMM for the logits, the gather kernel forward, the per-token derivative of
the loss (the ``ppo_policy_loss`` op's backward, with the aggregation's token weights as its row
weights), the gather kernel backward in place, and two GEMMs for d(hidden) and d(weight). That is three
GEMMs in all, against four for ``linear_logprobs`` followed by ``ppo_policy_loss`` (whose backward must
recompute the logits). The loss value and the stats are one call of ``ppo_policy_loss`` on the finished
log-probs. The backward only scales the stored gradients by the incoming one.

Layers, from the user down:
    linear_ppo_policy_loss()     backend choice and the chunk size; for torch / triton also validation
    cpp, cuda: fastrlhf::linear_ppo_policy_loss, a TORCH_LIBRARY op (csrc/linear_ppo_loss_op.cpp): checks,
        the chunk loop and the autograd formula in C++
    triton: ``_FusedLinearPolicyLoss`` below, the same loop in Python over the Triton gather kernels
"""

from __future__ import annotations

import dataclasses

import torch

from fastrlhf.ops import reference
from fastrlhf.ops._backend import COMPILED_OP_BACKENDS, compiled_ops_run_on, pick_backend, runs_compiled_op
from fastrlhf.ops._compiled import CompiledOp
from fastrlhf.ops._linear_chunks import LinearGrads, LinearHead, backward_chunk, chunk_bounds
from fastrlhf.ops._validation import (
    FLOAT_DTYPES,
    check_finite,
    check_labels_in_range,
    check_mask,
    check_positive_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from fastrlhf.ops.gather_logprobs import forward_kernel
from fastrlhf.ops.kl_penalty import check_estimator
from fastrlhf.ops.linear_logprobs import (
    check_chunk_size,
    check_linear_inputs,
    compiled_chunk_rows,
    kernel_backend,
)
from fastrlhf.ops.reference import LOSS_AGGREGATIONS, PolicyLossResult

# The backends of ``ppo_policy_loss``: the reference and the C++/CUDA op (no Triton kernel: the loss is a
# few flops per token read, and a TORCH_LIBRARY op is the cheapest call).
POLICY_LOSS_BACKENDS = ("torch", "cpp", "cuda")

_PPO_POLICY_LOSS = CompiledOp("ppo_policy_loss")
_LINEAR_PPO_POLICY_LOSS = CompiledOp("linear_ppo_policy_loss")


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
    """The checked scalar settings of the policy loss (see ``ppo_policy_loss``)."""

    clip_eps_low: float
    clip_eps_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    loss_agg: str

    def token_losses(self, logprobs, old_logprobs, advantages, ref_logprobs, entropy):
        return reference.ppo_token_losses(
            logprobs,
            old_logprobs,
            advantages,
            self.clip_eps_low,
            self.clip_eps_high,
            self.dual_clip,
            ref_logprobs,
            self.kl_coef,
            self.kl_estimator,
            entropy,
            self.entropy_coef,
        )

    def op_arguments(self) -> tuple:
        """The ``ppo_policy_loss`` op's scalar arguments before ``loss_agg``, in its schema's order."""
        return (
            self.clip_eps_low,
            self.clip_eps_high,
            self.dual_clip,
            self.kl_coef,
            self.kl_estimator,
            self.entropy_coef,
        )

    def reference_kwargs(self) -> dict:
        return dict(
            clip_eps=self.clip_eps_low,
            clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            kl_coef=self.kl_coef,
            kl_estimator=self.kl_estimator,
            loss_agg=self.loss_agg,
        )


def check_loss_options(
    clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg
) -> PolicyLossOptions:
    clip_eps = check_positive_finite("clip_eps", clip_eps)
    clip_eps_high = (
        clip_eps if clip_eps_high is None else check_positive_finite("clip_eps_high", clip_eps_high)
    )
    if clip_eps >= 1.0:
        raise ValueError(
            f"clip_eps must be in (0, 1) (the ratio is clipped to [1 - clip_eps, ...]), got {clip_eps}"
        )
    if dual_clip is not None:
        dual_clip = check_positive_finite("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (it caps -A·ratio for A < 0), got {dual_clip}")
    check_estimator(kl_estimator)
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_agg={loss_agg!r} is not one of {LOSS_AGGREGATIONS}")
    return PolicyLossOptions(
        clip_eps,
        clip_eps_high,
        dual_clip,
        check_finite("kl_coef", kl_coef),
        kl_estimator,
        check_finite("entropy_coef", entropy_coef),
        loss_agg,
    )


def _check_token_tensors(first_name: str, first: torch.Tensor, loss_agg: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t, FLOAT_DTYPES)
    check_same_shape(first_name, first, **tensors)
    if loss_agg == "seq-mean-token-mean" and first.dim() != 2:
        raise ValueError(
            f"loss_agg='seq-mean-token-mean' needs [batch, time] inputs, but {first_name} has shape "
            f"{tuple(first.shape)}"
        )


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    backend: str = "auto",
) -> PolicyLossResult:
    """PPO's clipped surrogate loss from per-token log-probs.

    Per valid token, with ``r = exp(logp - old_logp)``:
    ``max(-A·r, -A·clip(r, 1 - clip_eps, 1 + clip_eps_high)) + kl_coef·KL(logp, ref) - entropy_coef·H``.

    Args:
        logprobs: ``[B, T]`` the current policy's log-probs (differentiable).
        old_logprobs, advantages: ``[B, T]`` from the rollout (constants).
        mask: ``[B, T]`` 0/1 or bool, the response tokens.
        clip_eps / clip_eps_high: the lower / upper clip range (asymmetric when ``clip_eps_high`` is set).
        dual_clip: optional c > 1 that caps the loss of negative-advantage tokens at ``-A·c``.
        ref_logprobs: ``[B, T]`` or None; with ``kl_coef`` the KL to it (estimator ``kl_estimator``:
            "k1", "k2", "k3" or "abs") joins the loss, and its mean is reported either way.
        entropy: ``[B, T]`` or None, e.g. from ``gather_logprobs(..., return_entropy=True)``; with
            ``entropy_coef`` it is a bonus (subtracted), and its mean is reported either way.
        loss_agg: "token-mean" (every valid token weighs the same) or "seq-mean-token-mean" (each
            sequence's token mean, then the mean over sequences).
        backend: "auto", "torch", "cpp" or "cuda" (see ``fastrlhf.ops``).
    Returns:
        ``PolicyLossResult(loss, clip_fraction, approx_kl, entropy, ref_kl)``: float32 scalars (float64
        for float64 input on the torch backend); the gradient flows to ``logprobs`` and ``entropy``.
    """
    inputs = (logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    if runs_compiled_op(backend, *inputs):
        try:
            out = _PPO_POLICY_LOSS(
                *inputs, clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg
            )
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
        else:
            return _compiled_result(out, entropy is not None, ref_logprobs is not None)
    options = check_loss_options(
        clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg
    )
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    _check_token_tensors(
        "logprobs",
        logprobs,
        loss_agg,
        old_logprobs=old_logprobs,
        advantages=advantages,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    check_same_shape("logprobs", logprobs, mask=mask)
    check_same_device(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    mask_u8 = check_mask("mask", mask)
    named = dict(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    named.update({k: v for k, v in dict(ref_logprobs=ref_logprobs, entropy=entropy).items() if v is not None})
    chosen = pick_backend(backend, logprobs.device, named, op_backends=POLICY_LOSS_BACKENDS)
    if chosen in COMPILED_OP_BACKENDS.values():
        out = _PPO_POLICY_LOSS(*inputs, *options.op_arguments(), options.loss_agg)
        return _compiled_result(out, entropy is not None, ref_logprobs is not None)
    return reference.ppo_policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask_u8,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        entropy_coef=options.entropy_coef,
        **options.reference_kwargs(),
    )


def _compiled_result(out, has_entropy: bool, has_ref: bool) -> PolicyLossResult:
    loss, clip_fraction, approx_kl, entropy, ref_kl, _row_weight = out
    return PolicyLossResult(
        loss, clip_fraction, approx_kl, entropy if has_entropy else None, ref_kl if has_ref else None
    )


def linear_ppo_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    compute_entropy: bool = False,
    loss_agg: str = "token-mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> PolicyLossResult:
    """``ppo_policy_loss`` of ``linear_logprobs(hidden, weight, labels, bias, temperature)``, fused: the
    ``[N, V]`` logits are never held, and the gradient is made in the same chunked pass.

    Args:
        hidden: ``[B, T, H]`` (``[..., H]`` for "token-mean") the policy's last hidden states.
        weight: ``[V, H]`` the lm_head, same dtype as ``hidden``; bias: ``[V]`` or None.
        labels: ``[B, T]`` the sampled tokens; ``ignore_index`` positions count as masked.
        old_logprobs, advantages, mask, ref_logprobs: ``[B, T]`` as in ``ppo_policy_loss``.
            ``old_logprobs=None`` is on-policy: the ratio's denominator is this forward's own log-prob,
            detached, so the ratio is exactly 1 and the gradient is ``-A·∇log π`` (clipping never binds).
            That is PPO's first (and only) update of a rollout whose policy has not moved since sampling:
            one epoch over one minibatch. It saves the separate pass that would compute the old log-probs.
        entropy_coef: entropy bonus; ``compute_entropy`` reports the mean entropy even without a bonus
            (it costs one more pass over each chunk).
        chunk_size, backend: as in ``linear_logprobs``; the other arguments as in ``ppo_policy_loss``.
    Returns:
        ``PolicyLossResult``; gradients flow to hidden, weight and bias.
    """
    # A bool is an int to the typed call; the Python path refuses it as a chunk size.
    plain_chunk = chunk_size is None or type(chunk_size) is int
    inputs = (hidden, weight, labels, bias, old_logprobs, advantages, mask, ref_logprobs)
    if plain_chunk and runs_compiled_op(backend, *inputs):
        # The arguments as given, in the schema's order: the C++ op checks them.
        try:
            out = _LINEAR_PPO_POLICY_LOSS(
                *inputs,
                temperature,
                ignore_index,
                clip_eps,
                clip_eps_high,
                dual_clip,
                kl_coef,
                kl_estimator,
                entropy_coef,
                compute_entropy,
                loss_agg,
                compiled_chunk_rows(hidden, weight, labels, chunk_size),
            )
        except TypeError:  # an argument of a type the schema does not take: the checks below name it
            pass
        else:
            return _linear_result(out, compute_entropy or entropy_coef != 0.0, ref_logprobs is not None)
    options = check_loss_options(
        clip_eps, clip_eps_high, dual_clip, kl_coef, kl_estimator, entropy_coef, loss_agg
    )
    device = check_linear_inputs(hidden, weight, labels, bias)
    _check_token_tensors(
        "labels",
        labels,
        loss_agg,
        old_logprobs=old_logprobs,
        advantages=advantages,
        ref_logprobs=ref_logprobs,
    )
    check_same_shape("labels", labels, mask=mask)
    check_same_device(
        hidden=hidden, old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs
    )
    mask_u8 = check_mask("mask", mask)
    temperature = check_positive_finite("temperature", temperature)
    ignore_index = int(ignore_index)
    vocab, hidden_size, rows = weight.shape[0], hidden.shape[-1], labels.numel()
    chunk_rows = check_chunk_size(chunk_size, rows, hidden_size, vocab, device)
    check_labels_in_range(labels, vocab, ignore_index)
    with_entropy = compute_entropy or options.entropy_coef != 0.0
    chosen = kernel_backend(backend, hidden, device)
    if chosen in COMPILED_OP_BACKENDS.values():
        with_entropy = bool(with_entropy)
        out = _LINEAR_PPO_POLICY_LOSS(
            *inputs, temperature, ignore_index, *options.op_arguments(), with_entropy, loss_agg, chunk_rows
        )
        return _linear_result(out, with_entropy, ref_logprobs is not None)
    if chosen == "torch":
        return reference.linear_ppo_policy_loss(
            hidden,
            weight,
            labels,
            old_logprobs,
            advantages,
            mask_u8,
            bias,
            temperature,
            ignore_index,
            compute_entropy=with_entropy,
            entropy_coef=options.entropy_coef,
            ref_logprobs=ref_logprobs,
            **options.reference_kwargs(),
        )

    valid = mask_u8.bool() & (labels != ignore_index)
    flat = dict(
        old_logprobs=None if old_logprobs is None else old_logprobs.reshape(-1).float(),
        advantages=advantages.reshape(-1).float(),
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.reshape(-1).float(),
        valid=valid.reshape(-1),
    )
    # The loss value and the stats: one call of the log-prob form on the log-probs the gradient saw.
    # ``ppo_policy_loss`` fills it in the forward pass below, and the loss returned is its loss.
    stats_out: list[PolicyLossResult] = []

    def loss_and_stats(logprobs_flat, entropy_flat) -> PolicyLossResult:
        shaped = logprobs_flat.view(labels.shape)
        return ppo_policy_loss(
            shaped,
            shaped if old_logprobs is None else old_logprobs,
            advantages,
            valid,
            ref_logprobs=ref_logprobs,
            entropy=entropy_flat.view(labels.shape) if with_entropy else None,
            entropy_coef=options.entropy_coef,
            **options.reference_kwargs(),
        )

    loss, logprobs, _entropy = _FusedLinearPolicyLoss.apply(
        hidden.reshape(rows, hidden_size),
        weight,
        bias,
        labels.reshape(-1).to(torch.int64).contiguous(),
        _chunk_loss_weights(valid, options.loss_agg),
        flat,
        _FusedConfig(1.0 / temperature, ignore_index, with_entropy, chunk_rows, chosen, options),
        loss_and_stats,
        stats_out,
    )
    return stats_out[0]._replace(loss=loss, logprobs=logprobs.view(labels.shape))


def _linear_result(out, with_entropy: bool, has_ref: bool) -> PolicyLossResult:
    """The ``linear_ppo_policy_loss`` C++ op's outputs as a ``PolicyLossResult``."""
    loss, clip_fraction, approx_kl, entropy, ref_kl, logprobs, _token_entropy = out
    entropy = entropy if with_entropy else None
    return PolicyLossResult(loss, clip_fraction, approx_kl, entropy, ref_kl if has_ref else None, logprobs)


def _chunk_loss_weights(valid: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """The loss's weight of each token, as the per-chunk gradient takes it: ``[1]`` (every valid token's
    weight, 1/valid tokens) for "token-mean", ``[N]`` per token (``reference.loss_token_weights``) for
    "seq-mean-token-mean"."""
    if loss_agg == "token-mean":
        return (1.0 / valid.sum().clamp_min(1).to(torch.float32)).reshape(1)
    return reference.loss_token_weights(valid, loss_agg, torch.float32).reshape(-1)


@dataclasses.dataclass(frozen=True)
class _FusedConfig:
    inv_temperature: float
    ignore_index: int
    with_entropy: bool
    chunk_rows: int
    backend: str
    options: PolicyLossOptions


def _token_gradients(options: PolicyLossOptions, logprobs, entropy, old, adv, ref, valid, weights, compiled):
    """d(Σ w·token_loss)/d(logp) and /d(entropy) of one chunk's ``[C]`` tokens (``weights``: ``[1]`` for
    token-mean, ``[C]`` per token otherwise; see ``_chunk_loss_weights``). Masked tokens get exactly 0.

    ``compiled``: the backward of the ``ppo_policy_loss`` TORCH_LIBRARY op, whose ``row_weight`` input
    takes the weights (per token: the chunk as ``[C, 1]`` rows of one token, "seq-mean-token-mean"), one
    call of C++. Otherwise autograd through the reference's token losses."""
    if compiled:
        per_token = weights.numel() != 1
        shape = (-1, 1) if per_token else (-1,)

        def column(t):
            return None if t is None else t.view(shape)

        grad_lp, grad_ent = torch.ops.fastrlhf.ppo_policy_loss_backward(
            weights.new_ones(()),
            column(logprobs),
            column(old),
            column(adv),
            column(valid),
            column(ref),
            column(entropy),
            weights,
            *options.op_arguments(),
            "seq-mean-token-mean" if per_token else "token-mean",
        )
        return grad_lp.view(-1), None if entropy is None else grad_ent.view(-1)
    token_weights = weights.expand(logprobs.shape) if weights.numel() == 1 else weights
    with torch.enable_grad():
        lp = logprobs.detach().requires_grad_(True)
        ent = None
        if entropy is not None:
            ent = entropy.detach().requires_grad_(True)
        old, adv, ref, _ = reference.safe_token_inputs(valid, lp, old, adv, ref)
        token_loss, _ = options.token_losses(lp, old, adv, ref, ent)
        chunk_loss = torch.where(valid, token_loss * token_weights, torch.zeros_like(token_loss)).sum()
        inputs = [lp] if ent is None else [lp, ent]
        grads = torch.autograd.grad(chunk_loss, inputs, allow_unused=True)
    grad_lp = torch.zeros_like(logprobs) if grads[0] is None else grads[0]
    grad_ent = None
    if ent is not None:
        grad_ent = torch.zeros_like(logprobs) if grads[1] is None else grads[1]
    return grad_lp.contiguous(), None if grad_ent is None else grad_ent.contiguous()


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """(loss, logprobs ``[N]``, entropy ``[N]`` or ``[0]``); only the loss is differentiable.

    ``loss_and_stats(logprobs, entropy)`` gives the loss value and the stats once every chunk's log-probs
    are known; its result is appended to ``stats_out``."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, loss_weights, flat, config: _FusedConfig, loss_and_stats, stats_out
    ):
        options = config.options
        need_hidden, need_weight, need_bias = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
        )
        need_grads = need_hidden or need_weight or need_bias
        head = LinearHead(weight, bias)
        grads = LinearGrads(hidden, weight, bias, need_hidden, need_weight, need_bias) if need_grads else None
        rows = hidden.shape[0]
        logprobs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(rows if config.with_entropy else 0, dtype=torch.float32, device=hidden.device)
        empty = logprobs.new_empty(0)
        ref, old, valid = flat["ref_logprobs"], flat["old_logprobs"], flat["valid"]
        entropy_in_loss = options.entropy_coef != 0.0
        per_token_weights = loss_weights.numel() != 1
        compiled = compiled_ops_run_on(hidden.device.type)
        for start, end in chunk_bounds(rows, config.chunk_rows):
            rows_slice = slice(start, end)
            logits = head.logits(hidden[rows_slice])
            lp, stats, ent = forward_kernel(
                config.backend,
                logits,
                labels[rows_slice],
                config.inv_temperature,
                config.ignore_index,
                config.with_entropy,
            )
            logprobs[rows_slice] = lp
            if config.with_entropy:
                entropy[rows_slice] = ent
            grad_lp, grad_ent = _token_gradients(
                options,
                lp,
                ent if entropy_in_loss else None,
                lp if old is None else old[rows_slice],  # on-policy: the chunk's own log-probs
                flat["advantages"][rows_slice],
                None if ref is None else ref[rows_slice],
                valid[rows_slice],
                loss_weights[rows_slice] if per_token_weights else loss_weights,
                compiled,
            )
            if grads is not None:
                backward_chunk(
                    head,
                    grads,
                    hidden[rows_slice],
                    labels[rows_slice],
                    stats,
                    ent if entropy_in_loss else empty,
                    grad_lp,
                    grad_ent if entropy_in_loss else empty,
                    config.inv_temperature,
                    config.ignore_index,
                    config.backend,
                    start,
                    logits=logits,
                )
            del logits
        d_hidden, d_weight, d_bias = grads.results(weight, bias) if grads is not None else (None, None, None)
        stats = loss_and_stats(logprobs, entropy)
        stats_out.append(stats)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.mark_non_differentiable(logprobs, entropy)
        return stats.loss.clone(), logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)

        def scaled(grad):
            # Always a new tensor, even for an upstream gradient of 1 (as in the C++ op): a caller may
            # change a returned gradient in place between two backward passes of a retained graph.
            if grad is None:
                return None
            return (grad.float() * scale).to(grad.dtype)

        return scaled(d_hidden), scaled(d_weight), scaled(d_bias), None, None, None, None, None, None
