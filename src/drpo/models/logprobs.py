"""Token log-probs (and entropy) of a causal LM's forward, from hidden states without
materializing the logits.

The LM head turns `tokens x hidden` into `tokens x vocab` logits; at vocab 49k and 8k tokens
the fp32 logits alone are 1.6 GB, and autograd keeps several copies of that size. Here the
work is split into tiles of tokens x vocabulary entries: the forward keeps only the per-token
log-sum-exp, the backward recomputes each tile's logits and turns them into gradients right
away, so the extra memory is one tile (32 MiB by default) plus the LM head's gradient.

    token_logprobs(hidden, weight, targets)        -> logp  (differentiable, exact to fp32 rounding)
    sequence_logprobs(model, input_ids, attention_mask, response_start=P) -> logp of the response

A model-side computation (the rollout engine and the trainer both use it); the policy loss
fused with it lives in `drpo.logprobs`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 1024
# 1024 x 8192 fp32 logits = 32 MiB per tile: big enough for efficient matmuls, small enough
# that the LM head's gradients (not the logits) dominate the extra memory.
DEFAULT_VOCAB_CHUNK_SIZE = 8192


# ----------------------------------------------------------------------------- validation


def _check_inputs(hidden: Any, weight: Any, targets: Any, temperature: float, chunk_size: int) -> None:
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"`hidden` must be a floating-point tensor, got dtype {hidden.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"`weight` must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be the LM head [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"`hidden` last dim must equal the LM head's hidden size {weight.shape[1]}, got shape {tuple(hidden.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"`targets` must be an integer (long) tensor, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"`targets` shape {tuple(targets.shape)} must equal `hidden` shape without its last dim "
            f"{tuple(hidden.shape[:-1])}"
        )
    if targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= weight.shape[0]:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`targets` holds token id {bad}, outside the vocabulary [0, {weight.shape[0]})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    _check_chunk("chunk_size", chunk_size)


class NonFiniteError(ValueError):
    """A NaN/inf in the hidden states or the LM head weight: the model's own numbers overflowed
    (a trainer reads it as a divergence; other ValueErrors here are bad input)."""


def _check_finite(name: str, x: Tensor) -> None:
    """A NaN/inf in the hidden states or the head would silently poison every log-prob."""
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise NonFiniteError(f"`{name}` has a non-finite value {x[idx].item()} at index {idx}")


def _check_chunk(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")


# ----------------------------------------------------------------------------- chunk math
#
# Work is split into tiles of `chunk_size` tokens x `vocab_chunk_size` vocabulary entries.
# Each tile's logits go into one preallocated fp32 buffer and all softmax math happens in
# place there: nothing is allocated (or page-faulted) per tile, and at most one tile (two
# with entropy) is alive at any time. The forward folds the tiles of a token chunk into an
# online log-sum-exp; the backward turns each recomputed tile into its gradient right away.


def _tiles(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _buffer(rows: int, cols: int, device) -> Tensor:
    """Flat storage for one [rows, cols] fp32 tile (views of any smaller tile stay contiguous)."""
    return torch.empty(rows * cols, dtype=torch.float32, device=device)


def _view(buf: Tensor, rows: int, cols: int) -> Tensor:
    return buf[: rows * cols].view(rows, cols)


def _common(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, Tensor]:
    """The matmul dtype and the weight in it (a copy only for mixed-dtype inputs)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype, (weight if weight.dtype == dtype else weight.to(dtype))


def _logits_into(buf: Tensor, h: Tensor, w_tile: Tensor, temperature: float, minus: Tensor | None = None) -> Tensor:
    """fp32 logits / T of one tile (minus a per-row value, e.g. the log-sum-exp), in `buf`.
    The matmul runs in the inputs' (common) dtype, as the model's own LM head would; the
    softmax math in fp32. In fp32 the scaling and the shift ride along in the GEMM
    (addmm's alpha and bias) instead of costing extra passes over the tile."""
    z = _view(buf, h.shape[0], w_tile.shape[0])
    if w_tile.dtype == torch.float32:
        if minus is None:
            torch.addmm(z, h, w_tile.t(), beta=0.0, alpha=1.0 / temperature, out=z)  # beta=0: z's contents ignored
        else:
            torch.addmm(-minus[:, None], h, w_tile.t(), alpha=1.0 / temperature, out=z)
        return z
    z.copy_(h @ w_tile.t())
    if temperature != 1.0:
        z.div_(temperature)
    if minus is not None:
        z.sub_(minus[:, None])
    return z


def _in_tile(targets: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """Rows whose target falls in vocabulary tile [v0, v1), and the target's column there."""
    rows = ((targets >= v0) & (targets < v1)).nonzero().squeeze(-1)
    return rows, targets[rows] - v0


class _OnlineSoftmax:
    """Running max m, S = sum exp(z - m) and A = sum exp(z - m) (z - m) over vocabulary tiles.
    At the end lse = m + log S and entropy = log S - A/S: both terms >= 0, no cancellation
    (unlike lse - sum p z). On a max change m -> m', exp(z - m') = exp(z - m) exp(m - m') and
    z - m' = (z - m) - (m' - m), so S' = c S and A' = c (A - (m' - m) S) with c = exp(m - m')."""

    def __init__(self, n: int, device, with_entropy: bool):
        self.m = torch.full((n,), float("-inf"), device=device)
        self.s = torch.zeros(n, device=device)
        self.a = torch.zeros(n, device=device) if with_entropy else None
        self.target_z = torch.zeros(n, device=device)

    def fold_(self, z: Tensor, targets: Tensor, v0: int, ebuf: Tensor | None) -> None:
        """Fold one tile of fp32 logits (destroyed) into the statistics."""
        rows, cols = _in_tile(targets, v0, v0 + z.shape[1])
        self.target_z[rows] = z[rows, cols]
        new_m = torch.maximum(self.m, z.amax(dim=-1))
        c = torch.exp(self.m - new_m)
        x = z.sub_(new_m[:, None])
        if self.a is None:
            tile_s = x.exp_().sum(-1)
        else:
            shift = torch.where(self.s > 0, new_m - self.m, torch.zeros_like(new_m))  # no inf*0 on tile 1
            self.a = c * (self.a - shift * self.s)
            e = torch.exp(x, out=_view(ebuf, *x.shape))
            tile_s = e.sum(-1)
            self.a += torch.mul(e, x, out=e).sum(-1)
        self.s = self.s * c + tile_s
        self.m = new_m

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        log_s = self.s.log()
        lse = self.m + log_s
        ent = None if self.a is None else log_s - self.a / self.s
        return lse, self.target_z - lse, ent


def _grad_logits_(
    logp_all: Tensor, targets: Tensor, v0: int, g_logp: Tensor, g_ent: Tensor | None, ent: Tensor | None,
    ebuf: Tensor | None, temperature: float,
) -> Tensor:
    """d(sum g_logp*logp + g_ent*entropy)/d(logits) for one tile starting at vocabulary
    index v0, overwriting `logp_all` (the tile's fp32 log-probs, z - lse with z = logits / T).

    logp_t = z_t - lse   -> d/dz_j = 1[j = t] - p_j
    H = -sum p log p     -> d/dz_j = -p_j (log p_j + H)
    and z = logits / T adds a factor 1/T."""
    if g_ent is None:
        grad = logp_all.exp_().mul_(-g_logp[:, None])
    else:
        p = torch.exp(logp_all, out=_view(ebuf, *logp_all.shape))
        grad = logp_all.add_(ent[:, None]).mul_(-g_ent[:, None]).sub_(g_logp[:, None]).mul_(p)
    rows, cols = _in_tile(targets, v0, v0 + grad.shape[1])
    grad.index_put_((rows, cols), g_logp[rows], accumulate=True)
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _accumulate_grads(grad_z: Tensor, h32: Tensor, w32_tile: Tensor, gh32: Tensor | None,
                      grad_w_tile: Tensor | None) -> None:
    """Chain rule through logits = h @ W.T for one tile, accumulated in fp32 whatever the
    inputs' dtype (rounding each tile's product to bf16 before summing would bias it):
    grad_h += G W_tile, grad_W_tile += G.T h."""
    if gh32 is not None:
        gh32.addmm_(grad_z, w32_tile)
    if grad_w_tile is not None:
        grad_w_tile.addmm_(grad_z.t(), h32)


class _ChunkedLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N], entropy [N] or empty) in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, vocab_chunk_size, with_entropy):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype, w = _common(hidden, weight)
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
        rows, cols = min(n, chunk_size), min(vocab, vocab_chunk_size)
        zbuf = _buffer(rows, cols, hidden.device)
        ebuf = _buffer(rows, cols, hidden.device) if with_entropy else None
        for s, e in _tiles(n, chunk_size):
            h = hidden[s:e].to(dtype)
            stats = _OnlineSoftmax(e - s, hidden.device, with_entropy)
            for v0, v1 in _tiles(vocab, vocab_chunk_size):
                stats.fold_(_logits_into(zbuf, h, w[v0:v1], temperature), targets[s:e], v0, ebuf)
            lse[s:e], logp[s:e], ent_c = stats.result()
            if with_entropy:
                ent[s:e] = ent_c
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.sizes = (temperature, chunk_size, vocab_chunk_size, with_entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        temperature, chunk_size, vocab_chunk_size, with_entropy = ctx.sizes
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_ent = g_ent.float() if (with_entropy and g_ent is not None) else None
        dtype, w = _common(hidden, weight)
        w32 = weight.float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows, cols = min(n, chunk_size), min(vocab, vocab_chunk_size)
        zbuf = _buffer(rows, cols, hidden.device)
        ebuf = _buffer(rows, cols, hidden.device) if g_ent is not None else None
        for s, e in _tiles(n, chunk_size):
            h = hidden[s:e].to(dtype)
            h32 = hidden[s:e].float()
            gh32 = torch.zeros((e - s, hidden.shape[1]), device=hidden.device) if need_h else None
            for v0, v1 in _tiles(vocab, vocab_chunk_size):
                logp_all = _logits_into(zbuf, h, w[v0:v1], temperature, minus=lse[s:e])
                grad_z = _grad_logits_(logp_all, targets[s:e], v0, g_logp[s:e],
                                       None if g_ent is None else g_ent[s:e], None if g_ent is None else ent[s:e],
                                       ebuf, temperature)
                _accumulate_grads(grad_z, h32, w32[v0:v1], gh32, None if grad_w is None else grad_w[v0:v1])
            if need_h:
                grad_h[s:e] = gh32
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _flatten(hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, with_entropy: bool = False,
                   vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
                   validate: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature)[targets], in tiles of `chunk_size`
    tokens x `vocab_chunk_size` vocabulary entries.

    hidden [..., H] (any float dtype), weight [V, H], targets [...] integer ids.
    Returns logp [...] fp32, and entropy [...] fp32 of the same distribution if
    `with_entropy`. Differentiable w.r.t. hidden and weight (backward recomputes each tile's
    logits); never holds more than one fp32 tile (two with entropy) of logits at a time.
    Exact to fp32 rounding versus log_softmax on the full logits. `validate` checks hidden
    and weight for NaN/inf (one cheap pass over each).
    """
    _check_inputs(hidden, weight, targets, temperature, chunk_size)
    _check_chunk("vocab_chunk_size", vocab_chunk_size)
    if validate:
        _check_finite("hidden", hidden)
        _check_finite("weight", weight)
    shape = targets.shape
    h2, t2 = _flatten(hidden, targets)
    logp, ent = _ChunkedLogprobs.apply(h2, weight, t2, float(temperature), chunk_size, vocab_chunk_size,
                                       bool(with_entropy))
    if with_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


# ----------------------------------------------------------------------------- models


def lm_head_weight(model) -> Tensor:
    """The LM head matrix [V, H] of a causal LM, refusing heads this module cannot reproduce
    (a bias, logit soft-capping or scaling would make the log-probs wrong)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"model {type(model).__name__} has no output embedding (LM head) weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"model {type(model).__name__}: LM heads with a bias are not supported")
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"model {type(model).__name__}: config.{attr}={value!r} is not supported")
    return head.weight


def backbone(model):
    """The transformer body that yields last hidden states (no LM head)."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    if body is None or body is model:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError(f"cannot find the backbone (decoder / base_model) of {type(model).__name__}")
    return body


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (left padding gets position 0), as in HF generate."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, *, response_start: int,
                      temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log-probs (fp32) of input_ids[:, response_start:] given everything before them, for any
    HF causal LM: backbone hidden states, then `token_logprobs` with the LM head weight.
    Returns [B, L - response_start] (and the entropies of the same distributions)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be a [batch, length] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` must match `input_ids` shape {tuple(input_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', attention_mask)!r}"
        )
    length = input_ids.shape[1]
    if isinstance(response_start, bool) or not isinstance(response_start, int) or not 1 <= response_start < length:
        raise ValueError(f"`response_start` must be an int in [1, {length - 1}], got {response_start!r}")
    weight = lm_head_weight(model)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    hidden = out.last_hidden_state[:, response_start - 1 : -1]
    return token_logprobs(hidden, weight, input_ids[:, response_start:], temperature=temperature,
                          chunk_size=chunk_size, with_entropy=with_entropy)
