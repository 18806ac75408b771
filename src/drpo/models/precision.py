"""Precision emulation for the rollout engine (and the fp8 end-to-end training forward).

    fp32      reference: the engine copy is an exact fp32 copy of the policy.
    bf16      the engine copy is cast to bfloat16 and computes in bf16 end to end (weights,
              activations, attention, logits), as a bf16 inference server does; sampling
              and log-probs are taken from its logits upcast to fp32.
    fp8_e4m3  weight-only fake quantization (W8A16-style serving): every nn.Linear and
    fp8_e5m2  nn.Embedding weight (the LM head included) is scaled per output channel
              (row) so its max |value| maps to the format's max, cast to torch.float8_e4m3fn /
              float8_e5m2 and back, and multiplied by the scale again; compute stays fp32.
              Norm weights and biases stay fp32 (servers keep them in high precision).
    fp8_e2e   fp8 end to end, with the rollout and training kernels differing as they do in
              real stacks: both sides use the same e4m3 per-channel weights (the trainer
              through `quantized_forward`, a straight-through estimator so gradients reach
              the fp32 master weights), but the engine's kernel computes activations,
              attention and KV cache in bf16 (an fp8 serving GEMM with bf16 activations),
              while the trainer's forward computes in fp32. So the mismatch is small but
              not zero, as in FP8 end-to-end RL, where rollout and trainer run different
              kernels.

Per-channel scaling is the usual choice of fp8 weight quantization (vLLM's per-channel FP8,
TransformerEngine's block/row scaling): a single outlier row cannot wreck every other row.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

PRECISIONS = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2", "fp8_e2e")

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp8_e2e": torch.float8_e4m3fn}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def fp8_fake_quantize(weight: Tensor, fp8_dtype: torch.dtype) -> Tensor:
    """Per-row (output channel) scaled fp8 round trip of a 2-D weight, in its own dtype:
    scale = amax(|row|) / fp8_max, q = float8(w / scale), return q * scale. An all-zero
    row keeps scale 1 (it quantizes to zeros either way)."""
    if weight.dim() != 2:
        raise ValueError(f"fp8 fake quantization expects a 2-D weight, got shape {tuple(weight.shape)}")
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"`fp8_dtype` must be torch.float8_e4m3fn or torch.float8_e5m2, got {fp8_dtype}")
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(fp8_dtype).max, torch.ones_like(amax))
    q = (w / scale).to(fp8_dtype).float() * scale
    return q.to(weight.dtype)


def quantizable_weights(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, weight) of every Linear and Embedding, each distinct parameter once (tied
    input/output embeddings are one parameter)."""
    seen: set[int] = set()
    found = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(module.weight, Tensor):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                found.append((module, module.weight))
    return found


@torch.no_grad()
def fake_quantize_weights_(model: nn.Module, precision: str) -> nn.Module:
    """Apply `precision` to `model`'s weights in place (see the module docstring):
    fp32 -> cast to fp32; bf16 -> cast the whole model to bfloat16; fp8_* -> fp32 with
    Linear/Embedding weights fp8 fake-quantized per output channel; fp8_e2e -> those fp8
    weights, then the whole model cast to bfloat16 (the engine kernel's bf16 compute).
    Returns the model."""
    check_precision(precision)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    model.float()
    if precision in FP8_DTYPES:
        fp8 = FP8_DTYPES[precision]
        for _, weight in quantizable_weights(model):
            weight.copy_(fp8_fake_quantize(weight, fp8))
    if precision == "fp8_e2e":
        model.to(torch.bfloat16)
    return model


class _STEFakeQuant(nn.Module):
    """Parametrization: forward sees fp8-fake-quantized weights, backward is the identity."""

    def __init__(self, fp8_dtype: torch.dtype):
        super().__init__()
        self.fp8_dtype = fp8_dtype

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (fp8_fake_quantize(weight.detach(), self.fp8_dtype) - weight.detach())


@contextmanager
def quantized_forward(model: nn.Module, precision: str = "fp8_e2e"):
    """Inside the block, every Linear/Embedding `.weight` of `model` reads as its e4m3
    (per-channel) fake-quantized value with a straight-through gradient to the fp32 master
    weight, so the training forward matches an fp8 engine. Reading the weight through the
    attribute (e.g. `get_output_embeddings().weight` in `sequence_logprobs`) sees it too.
    For precisions other than fp8_e2e it does nothing. Parametrizations are removed on
    exit, leaving the original parameters untouched."""
    check_precision(precision)
    if precision != "fp8_e2e":
        yield model
        return
    fp8 = FP8_DTYPES[precision]
    targets = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    done = []
    try:
        for module in targets:
            parametrize.register_parametrization(module, "weight", _STEFakeQuant(fp8), unsafe=True)
            done.append(module)
        yield model
    finally:
        for module in reversed(done):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
