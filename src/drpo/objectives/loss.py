"""The public entry points: `policy_loss`, `gradient_weight`, `logp_gradient`, `aggregate`."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from drpo.objectives.diagnostics import METRIC_NAMES, diagnostic_tensors
from drpo.objectives.registry import Method, get_method

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
NONFINITE_MODES = ("raise", "drop")

# fp32 log-softmax can round a log-prob of ~0 to a tiny positive value; more than this is a bug.
POSITIVE_LOGP_TOL = 1e-4


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # Low-precision inputs are computed in fp32; fp64 stays fp64 (reference checks).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tensor(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


class _Checks:
    """Value checks computed on the device as counts of offending tokens, each paired with a
    function building its error message. The counts reach the host in the loss's one batched
    transfer; only a failing check pays further syncs, to name the position and value."""

    def __init__(self) -> None:
        self.counts: list[Tensor] = []
        self.messages: list = []

    def add(self, count: Tensor, message) -> None:
        self.counts.append(count)
        self.messages.append(message)

    def raise_failures(self, host_counts: list[float]) -> None:
        for n, message in zip(host_counts, self.messages):
            if n > 0:
                raise ValueError(message())


def _first_bad(name: str, x: Tensor, bad: Tensor, what: str) -> str:
    idx = tuple(bad.nonzero()[0].tolist())
    return f"`{name}` {what} {x[idx].item()} at response position {idx}"


class Prepared(NamedTuple):
    """`policy_loss`'s inputs, checked and normalized: fp32 (fp64 for fp64 inputs), every
    position outside the loss at neutral values (pi = mu = 1, A = 0, weight 0) so garbage
    there cannot leak into the loss or its gradient."""

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor  # [batch, seq]
    mask: Tensor  # bool: the tokens the loss uses (response tokens, less the dropped ones)
    token_weights: Tensor | None
    nonfinite: Tensor  # count of non-finite (or > 0) response tokens; dropped with nonfinite="drop"
    checks: _Checks  # the value checks, not yet read


def _check_layout(logp: Tensor, old_logp: Tensor, advantages: Tensor, nonfinite: str) -> None:
    """Types and shapes (host metadata, no sync)."""
    _check_tensor("logp", logp)
    _check_tensor("old_logp", old_logp)
    _check_tensor("advantages", advantages)
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"unknown `nonfinite` {nonfinite!r}; choose one of {', '.join(NONFINITE_MODES)}")
    if logp.dim() != 2:
        raise ValueError(f"`logp` must be shaped [batch, seq], got shape {tuple(logp.shape)}")
    if logp.shape[0] == 0 or logp.shape[1] == 0:
        raise ValueError(f"empty batch: `logp` has shape {tuple(logp.shape)}")
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"`old_logp` shape {tuple(old_logp.shape)} does not match `logp` shape {tuple(logp.shape)}")


def _bool_mask(mask: Tensor | None, logp: Tensor, checks: _Checks) -> Tensor:
    if mask is None:
        return torch.ones_like(logp, dtype=torch.bool)
    _check_tensor("mask", mask)
    if mask.shape != logp.shape:
        raise ValueError(f"`mask` shape {tuple(mask.shape)} does not match `logp` shape {tuple(logp.shape)}")
    if mask.dtype != torch.bool:
        checks.add(((mask != 0) & (mask != 1)).sum(), lambda: "`mask` must hold only 0/1 (or bool) values")
        mask = mask != 0
    return mask


def _advantages_2d(advantages: Tensor, batch: int, seq: int) -> Tensor:
    """[batch] -> [batch, 1]; refuses what does not broadcast per sequence or per token."""
    if advantages.dim() == 1 and advantages.shape[0] == batch:
        advantages = advantages[:, None]
    if advantages.dim() != 2 or advantages.shape[0] != batch or advantages.shape[1] not in (1, seq):
        raise ValueError(
            f"`advantages` must be shaped [batch], [batch, 1] or [batch, seq] = [{batch}, {seq}], "
            f"got shape {tuple(advantages.shape)}"
        )
    return advantages


def _broadcast_weights(token_weights: Tensor, mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    _check_tensor(name, token_weights)
    try:
        return torch.broadcast_to(token_weights.detach(), mask.shape).to(dtype)
    except RuntimeError:
        raise ValueError(f"`{name}` shape {tuple(token_weights.shape)} does not broadcast to {tuple(mask.shape)}") from None


def _nonfinite_tokens(named: list, mask: Tensor, nonfinite: str, checks: _Checks) -> tuple[Tensor, Tensor]:
    """(the mask less the dropped tokens, the non-finite ones): with "raise" each named input's
    non-finite values are a check; with "drop" they, and log-probs above 0 beyond fp
    rounding (as invalid), leave the mask."""
    nonfinite_any = torch.zeros_like(mask)
    for name, x in named:
        bad = mask & ~torch.isfinite(x.detach())
        nonfinite_any = nonfinite_any | bad
        if nonfinite == "raise":
            checks.add(bad.sum(), lambda name=name, x=x, bad=bad: _first_bad(name, x, bad, "has a non-finite value"))
    if nonfinite == "drop":
        for _, x in named[:2]:
            nonfinite_any = nonfinite_any | (mask & (x.detach() > POSITIVE_LOGP_TOL))
        mask = mask & ~nonfinite_any
    return mask, nonfinite_any


def _range_checks(logps: list, weights: tuple | None, mask: Tensor, checks: _Checks) -> None:
    """Log-probs <= 0 (beyond fp rounding); token weights >= 0."""
    for name, x in logps:
        worst = torch.where(mask, x.detach(), -1.0).amax()
        checks.add(
            (worst > POSITIVE_LOGP_TOL).sum(),
            lambda name=name, worst=worst: f"`{name}` must be log-probabilities (<= 0), got a value of {worst.item():.4g}",
        )
    if weights is not None:
        name, w = weights
        neg = mask & (w < 0)
        checks.add(neg.sum(), lambda: _first_bad(name, w, neg, "must be finite and >= 0, got"))


def _prepare_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None,
                    token_weights: Tensor | None = None, nonfinite: str = "raise",
                    token_weights_name: str = "token_weights") -> Prepared:
    """Check (layout on the host now, values as device-side counts for later) and normalize."""
    _check_layout(logp, old_logp, advantages, nonfinite)
    checks = _Checks()
    mask = _bool_mask(mask, logp, checks)
    batch, seq = logp.shape
    advantages = _advantages_2d(advantages, batch, seq)
    dtype = _compute_dtype(logp, old_logp, advantages)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    advantages = advantages.detach().to(dtype).expand(batch, seq)
    named = [("logp", logp), ("old_logp", old_logp), ("advantages", advantages)]
    if token_weights is not None:
        token_weights = _broadcast_weights(token_weights, mask, dtype, token_weights_name)
        named.append((token_weights_name, token_weights))
    mask, nonfinite_any = _nonfinite_tokens(named, mask, nonfinite, checks)
    _range_checks(named[:2], named[3] if token_weights is not None else None, mask, checks)
    # Neutral values outside the loss. The clamp removes fp rounding above 0.
    logp = torch.where(mask, logp, 0.0).clamp(max=0.0)
    old_logp = torch.where(mask, old_logp, 0.0).clamp(max=0.0)
    advantages = torch.where(mask, advantages, 0.0)
    if token_weights is not None:
        token_weights = torch.where(mask, token_weights, 0.0)
    return Prepared(logp, old_logp, advantages, mask, token_weights, nonfinite_any.sum(), checks)


def _prepare(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None) -> Prepared:
    """`_prepare_inputs` strict about non-finite values, its value checks read at once (one
    host transfer)."""
    p = _prepare_inputs(logp, old_logp, advantages, mask)
    _to_host(None, p.checks, p.logp.dtype)
    return p


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    *,
    horizon: int | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a [batch, seq] per-token loss to a scalar over response tokens (verl's names).

    token-mean               sum over all tokens / number of tokens
    seq-mean-token-sum       mean over sequences of the per-sequence sum
    seq-mean-token-mean      mean over sequences of the per-sequence mean
    seq-mean-token-sum-norm  mean over sequences of (per-sequence sum / horizon), horizon
                             defaults to the padded length (Dr. GRPO)
    Sequences with no response token are left out of sequence means; an all-padding batch
    gives an exact 0 (with a graph, so backward still works).

    `normalizer` replaces the local count the sum is divided by (tokens for token-mean,
    sequences for the seq-mean modes), e.g. verl's global-batch count / dp_size.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown `agg` {agg!r}; choose one of {', '.join(AGG_MODES)}")
    m = mask.to(per_token.dtype)
    masked = per_token * m
    if agg == "token-mean":
        return masked.sum() / (m.sum().clamp(min=1.0) if normalizer is None else normalizer)
    tokens_per_seq = m.sum(-1)
    n_seq = (tokens_per_seq > 0).to(per_token.dtype).sum().clamp(min=1.0) if normalizer is None else normalizer
    seq_sum = masked.sum(-1)
    if agg == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if agg == "seq-mean-token-mean":
        return (seq_sum / tokens_per_seq.clamp(min=1.0)).sum() / n_seq
    horizon = per_token.shape[-1] if horizon is None else horizon
    if not isinstance(horizon, int) or horizon <= 0:
        raise ValueError(f"`horizon` must be a positive int, got {horizon!r}")
    return (seq_sum / horizon).sum() / n_seq


def per_token_objective(
    method: str | Method, logp: Tensor, old_logp: Tensor, advantages: Tensor, **params: Any
) -> tuple[Tensor, Tensor]:
    """(J, penalty) per token, no validation or masking: the raw registered objective."""
    m = get_method(method)
    return m.objective(logp, old_logp, advantages, **m.resolve_params(params))


def policy_loss(method: str | Method, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None = None,
                *, agg: str = "token-mean", horizon: int | None = None, normalizer: float | Tensor | None = None,
                token_weights: Tensor | None = None, validate: bool = True, with_metrics: bool = True,
                nonfinite: str = "raise", **params: Any) -> tuple[Tensor, dict[str, float]]:
    """The loss (scalar, minimize) of `method` and its diagnostics over response tokens.

    logp        [batch, seq] current policy log-probs of the sampled tokens (differentiable)
    old_logp    [batch, seq] anchor log-probs (rollout/behaviour by default), detached
    advantages  [batch] or [batch, 1] (sequence, broadcast) or [batch, seq] (token)
    mask        [batch, seq] response mask (bool or 0/1); None means all tokens count
    agg         one of AGG_MODES; `horizon` for seq-mean-token-sum-norm; `normalizer`
                replaces the local token/sequence count (see `aggregate`)
    token_weights  optional non-negative per-token factors on the loss before aggregation
                (rollout-correction IS weights as verl and TRL apply them); broadcast to
                [batch, seq]. Diagnostics describe the unweighted tokens.
    nonfinite   "raise" (default): a NaN/inf at a response position of logp, old_logp,
                advantages or token_weights raises ValueError naming the argument.
                "drop": such tokens, and those whose logp or old_logp is > 1e-4 (not a
                log-probability), are removed from the loss exactly like padding (no
                contribution, no gradient, not in the normaliser) and counted in
                metrics["nonfinite_tokens"], as verl/TRL carry on past them.
    **params    the method's parameters (see `METHODS[method].params`)

    Host syncs: the diagnostics and the value checks (non-finite values, log-probs > 0,
    mask not 0/1, negative token weights) are computed on the device and read in one
    batched transfer. with_metrics=True: exactly one sync. with_metrics=False: none with
    nonfinite="drop" or validate=False (the value checks, which could only raise after a
    sync, are skipped then), one with the strict default. validate=False skips the checks.

    bf16/fp16 inputs are computed in fp32. See `drpo.objectives.diagnostics` for the
    metric names.
    """
    m = get_method(method)
    resolved = m.resolve_params(params)
    p = _prepare_inputs(logp, old_logp, advantages, mask, token_weights, nonfinite)
    j, penalty = m.objective(p.logp, p.old_logp, p.advantages, **resolved)
    per_token = -j if p.token_weights is None else -j * p.token_weights.to(j.dtype)
    loss = aggregate(per_token, p.mask, agg, horizon=horizon, normalizer=normalizer)
    values = _metric_tensors(m, resolved, p, penalty, loss) if with_metrics else None
    check = validate and (with_metrics or nonfinite == "raise")
    return loss, _to_host(values, p.checks if check else None, j.dtype)


def _metric_tensors(m: Method, resolved: dict, p: Prepared, penalty: Tensor, loss: Tensor) -> dict[str, Tensor]:
    """`policy_loss`'s metrics, still on the device, in the order of METRIC_NAMES then `loss`."""
    with torch.no_grad():
        values = diagnostic_tensors(m, resolved, p.logp.detach(), p.old_logp, p.advantages, p.mask, penalty)
    values["nonfinite_tokens"] = p.nonfinite
    values["loss"] = loss.detach()
    return {k: values[k] for k in (*METRIC_NAMES, "loss")}


def _to_host(values: dict[str, Tensor] | None, checks: _Checks | None, dtype: torch.dtype) -> dict[str, float]:
    """The metrics and the checks' counts in one device-to-host transfer (none when there is
    neither); raises the first failed check."""
    parts = [] if values is None else [v.to(dtype).reshape(()) for v in values.values()]
    counts = [] if checks is None else [c.to(dtype).reshape(()) for c in checks.counts]
    if not parts and not counts:
        return {}
    host = torch.stack(parts + counts).tolist()  # the call's one device-to-host transfer
    if checks is not None:
        checks.raise_failures(host[len(parts):])
    return {} if values is None else dict(zip(values, host[: len(parts)]))


def gradient_weight(method: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, **params: Any) -> Tensor:
    """The closed-form gradient weight w_t with dJ/dlogp = A * r * w (no gradient).

    `advantages` may be [batch, seq] or broadcastable to `logp`. Computed in fp32, or fp64
    for fp64 inputs. For advantage_weighted=False the weight is undefined at A == 0 and is
    reported as 1 there; `logp_gradient` gives the exact derivative everywhere.
    """
    m = get_method(method)
    resolved = m.resolve_params(params)
    dtype = _compute_dtype(logp, old_logp, advantages)
    logp = logp.detach().to(dtype)
    adv = torch.broadcast_to(advantages.detach().to(dtype), logp.shape)
    return m.weight(logp, old_logp.detach().to(dtype), adv, **resolved)


def logp_gradient(method: str, logp: Tensor, old_logp: Tensor, advantages: Tensor, **params: Any) -> Tensor:
    """Closed-form per-token dJ/dlogp: the method's own `gradient` where it registers one
    (needed where no weight w reproduces it, e.g. advantage_weighted=False at A == 0), else
    A * r * w from its `weight`."""
    from drpo.objectives.methods import ratio

    m = get_method(method)
    resolved = m.resolve_params(params)
    dtype = _compute_dtype(logp, old_logp, advantages)
    logp = logp.detach().to(dtype)
    old = old_logp.detach().to(dtype)
    adv = torch.broadcast_to(advantages.detach().to(dtype), logp.shape)
    if m.gradient is not None:
        return m.gradient(logp, old, adv, **resolved)
    return adv * ratio(logp, old) * m.weight(logp, old, adv, **resolved)
