"""Token log-probs from hidden states without the full logits, and the policy loss fused
with the LM head.

    token_logprobs(hidden, weight, targets)        -> logp  (differentiable, exact to fp32 rounding)
    fused_policy_loss("drpo", hidden, weight, ...) -> (loss, metrics)  (gradients computed in the
                                                      forward pass: one logits pass in total)
    sequence_logprobs(model, input_ids, attention_mask, response_start=P) -> logp of the response

The log-probs themselves are a model-side computation (`drpo.models.logprobs`, re-exported
here); this module adds the objectives on top of them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from drpo.models.logprobs import (  # noqa: F401  (re-exported: the public log-prob API)
    DEFAULT_CHUNK_SIZE, DEFAULT_VOCAB_CHUNK_SIZE, _accumulate_grads, _buffer, _check_chunk, _check_finite,
    _check_inputs, _common, _flatten, _logits_into, _OnlineSoftmax, _tiles, backbone, lm_head_weight,
    position_ids_from_mask, sequence_logprobs, token_logprobs,
)
from drpo.objectives import aggregate, get_method, policy_loss
from drpo.objectives.loss import _prepare

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_VOCAB_CHUNK_SIZE", "backbone", "fused_policy_loss", "lm_head_weight",
           "position_ids_from_mask", "sequence_logprobs", "token_logprobs"]


# ----------------------------------------------------------------------------- fused loss


def _aggregation_coefficients(mask: Tensor, agg: str, horizon: int | None) -> Tensor:
    """Every aggregation mode is linear in the per-token loss: loss = sum_t c_t * l_t. Its
    gradient at any point is c, which lets each chunk's loss gradient be computed on the
    spot, with the same semantics as `drpo.objectives.aggregate` (reused, not re-derived)."""
    x = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    with torch.enable_grad():
        (c,) = torch.autograd.grad(aggregate(x, mask, agg, horizon=horizon), x)
    return c


class _FusedPolicyLoss(torch.autograd.Function):
    """Forward computes logp, the loss and its gradients w.r.t. hidden and weight in one
    pass over the logits chunks (the loss is a sum of per-token terms, so each chunk's
    gradient is known as soon as its logits are); backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, coef, mask, method, params, temperature, chunk_size,
                vocab_chunk_size, with_grad):
        n = hidden.shape[0]
        need_h, need_w = (ctx.needs_input_grad[0] and with_grad), (ctx.needs_input_grad[1] and with_grad)
        logp = hidden.new_empty(n, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        dtype, w = _common(hidden, weight)
        w32 = weight.float()
        vocab = weight.shape[0]
        # Whole-vocabulary rows, as many as fit the token_logprobs tile budget: the full
        # distribution of a row is needed before its loss gradient is known.
        rows = max(1, min(chunk_size, chunk_size * vocab_chunk_size // vocab))
        zbuf = _buffer(min(n, rows), vocab, hidden.device)
        for s, e in _tiles(n, rows):
            z = _logits_into(zbuf, hidden[s:e].to(dtype), w, temperature)
            stats = _OnlineSoftmax(e - s, hidden.device, with_entropy=False)
            stats.fold_(z, targets[s:e], 0, None)  # z now holds exp(z - max): p = z / S
            _, lp, _ = stats.result()
            logp[s:e] = lp
            chunk_loss, g_logp = _chunk_loss_and_grad(lp, old[s:e], adv[s:e], coef[s:e], mask[s:e], method, params)
            loss += chunk_loss
            if need_h or need_w:
                # d loss/d z_j = g (1[j = t] - p_j), times 1/T: no recomputation of the logits.
                grad_z = z.mul_((-g_logp / stats.s)[:, None])
                idx = torch.arange(e - s, device=z.device)
                grad_z.index_put_((idx, targets[s:e]), g_logp, accumulate=True)
                if temperature != 1.0:
                    grad_z.div_(temperature)
                gh32 = torch.zeros((e - s, hidden.shape[1]), device=hidden.device) if need_h else None
                _accumulate_grads(grad_z, hidden[s:e].float(), w32, gh32, grad_w)
                if need_h:
                    grad_h[s:e] = gh32
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.mark_non_differentiable(logp)
        return loss.float(), logp

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        saved = iter(ctx.saved_tensors)
        grad_h = _scaled(next(saved), g_loss) if ctx.has[0] else None
        grad_w = _scaled(next(saved), g_loss) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None


def _scaled(grad: Tensor, g_loss: Tensor) -> Tensor:
    # The common case (loss.backward()) needs no extra full-size multiply.
    return grad if bool(g_loss == 1) else grad * g_loss.to(grad.dtype)


def _chunk_loss_and_grad(logp: Tensor, old: Tensor, adv: Tensor, coef: Tensor, mask: Tensor, method,
                         params: dict) -> tuple[Tensor, Tensor]:
    """sum_t c_t * (-J_t) over one chunk and its gradient w.r.t. the chunk's logp, with the
    same neutral padding as `policy_loss` (padding positions get no gradient)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        lp_c = torch.where(mask, lp, zero).clamp(max=0.0)
        old_c = torch.where(mask, old, zero).clamp(max=0.0)
        adv_c = torch.where(mask, adv, zero)
        j, _ = method.objective(lp_c[None], old_c[None], adv_c[None], **params)
        chunk_loss = (-j[0] * coef).sum()
        (g,) = torch.autograd.grad(chunk_loss, lp)
    return chunk_loss.detach().double(), g


def fused_policy_loss(method: str, hidden: Tensor, weight: Tensor, targets: Tensor, old_logp: Tensor,
                      advantages: Tensor, mask: Tensor | None, *, temperature: float = 1.0,
                      chunk_size: int = DEFAULT_CHUNK_SIZE, agg: str = "token-mean", horizon: int | None = None,
                      with_metrics: bool = True, vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
                      **params: Any) -> tuple[Tensor, dict[str, float]]:
    """`policy_loss(method, token_logprobs(hidden, weight, targets), old_logp, advantages, mask, ...)`
    without ever holding the full logits, and with one logits pass (the loss gradient is
    computed chunk by chunk during the forward, as Liger-Kernel's fused losses do).

    hidden [B, S, H], weight [V, H], targets/old_logp/mask [B, S], advantages [B], [B, 1] or
    [B, S]. Returns the same loss (value and gradients w.r.t. hidden and weight) and the same
    metrics as `policy_loss` on the naive log-probs. Works on whole-vocabulary blocks of
    chunk_size * vocab_chunk_size / V tokens (the same memory as one token_logprobs tile).
    """
    _check_inputs(hidden, weight, targets, temperature, chunk_size)
    _check_chunk("vocab_chunk_size", vocab_chunk_size)
    _check_finite("hidden", hidden)
    _check_finite("weight", weight)
    if targets.dim() != 2:
        raise ValueError(f"`targets` must be shaped [batch, seq], got shape {tuple(targets.shape)}")
    m = get_method(method)
    resolved = m.resolve_params(params)
    # Validate the small tensors exactly as policy_loss does (logp itself is not known yet).
    probe = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    p = _prepare(probe, old_logp, advantages, mask)
    coef = _aggregation_coefficients(p.mask, agg, horizon).to(p.old_logp.dtype)
    h2, t2 = _flatten(hidden, targets)
    loss, logp = _FusedPolicyLoss.apply(
        h2, weight, t2, p.old_logp.reshape(-1), p.advantages.reshape(-1), coef.reshape(-1), p.mask.reshape(-1),
        m, resolved, float(temperature), chunk_size, vocab_chunk_size, torch.is_grad_enabled(),
    )
    metrics: dict[str, float] = {}
    if with_metrics:
        # Metrics (and the loss value they report) from the same log-probs, via policy_loss itself.
        _, metrics = policy_loss(
            method, logp.reshape(targets.shape), old_logp, advantages, mask, agg=agg, horizon=horizon, **params
        )
        metrics["loss"] = float(loss.detach())
    return loss, metrics
