"""Precision emulation for the rollout engine (and the fp8 end-to-end training forward).

    fp32      reference: the engine copy is an exact fp32 copy of the policy.
    bf16      the engine copy is cast to bfloat16 and computes in bf16 end to end (weights,
              activations, attention, logits), as a bf16 inference server does; sampling
              and log-probs are taken from its logits upcast to fp32.
    fp8_e4m3  W8A8 fake quantization, as fp8 serving runs it (vLLM/SGLang fp8 GEMMs): every
    fp8_e5m2  nn.Linear and nn.Embedding weight (the LM head included) is scaled per output
              channel (row) so its max |value| maps to the format's max, cast to
              torch.float8_e4m3fn / float8_e5m2 and back, and multiplied by the scale again;
              and the input of every nn.Linear but the LM head is fake-quantized to the same
              format with a dynamic per-token scale at run time. Compute between the GEMMs
              stays fp32; norm weights and biases stay fp32 (servers keep them in high
              precision).
    fp8_e2e   fp8 end to end, with the rollout and training kernels differing as they do in
              real stacks: both sides quantize weights and activations the fp8_e4m3 way (the
              trainer through `quantized_forward`, straight-through estimators so gradients
              reach the fp32 master weights), but the engine's kernels compute everything
              between the GEMMs (norms, attention, KV cache, logits) in bf16, while the
              trainer's forward computes it in fp32. So the mismatch is small but not zero,
              as in FP8 end-to-end RL, where rollout and trainer run different kernels.

Per-channel scaling is the usual choice of fp8 weight quantization (vLLM's per-channel FP8,
TransformerEngine's block/row scaling): a single outlier row cannot wreck every other row.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from drpo.precisions import PRECISIONS  # the names; what each one does is this module

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


def fp8_fake_quantize_activations(x: Tensor, fp8_dtype: torch.dtype) -> Tensor:
    """Per-token (last dim) dynamically scaled fp8 round trip of an activation, in its own
    dtype, with a straight-through gradient (the rounding is treated as the identity)."""
    v = x.detach().float()
    amax = v.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / torch.finfo(fp8_dtype).max, torch.ones_like(amax))
    q = ((v / scale).to(fp8_dtype).float() * scale).to(x.dtype)
    return x + (q - x.detach())


def _activation_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers whose inputs fp8 GEMMs quantize: all but the LM head (read directly
    by the trainer's log-prob code, and kept in high precision by fp8 servers)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def _add_activation_quant(model: nn.Module, fp8_dtype: torch.dtype) -> list[nn.Module]:
    """A forward pre-hook quantizing the input of every `_activation_linears` module that
    has none yet (an engine re-quantized on sync keeps its own); returns the modules hooked."""
    def hook(module, args):
        return (fp8_fake_quantize_activations(args[0], fp8_dtype), *args[1:])

    hooked = []
    for module in _activation_linears(model):
        if getattr(module, "_drpo_fp8_act", None) is None:
            module._drpo_fp8_act = module.register_forward_pre_hook(hook)
            hooked.append(module)
    return hooked


def _remove_activation_quant(modules: list[nn.Module]) -> None:
    for module in modules:
        module._drpo_fp8_act.remove()
        del module._drpo_fp8_act


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
    Linear/Embedding weights fp8 fake-quantized per output channel and Linear inputs
    quantized per token at run time (forward pre-hooks, added once); fp8_e2e -> the e4m3
    version, then the whole model cast to bfloat16 (the engine kernels' bf16 compute).
    Returns the model."""
    check_precision(precision)
    if precision == "bf16":
        return model.to(torch.bfloat16)
    model.float()
    if precision in FP8_DTYPES:
        fp8 = FP8_DTYPES[precision]
        for _, weight in quantizable_weights(model):
            weight.copy_(fp8_fake_quantize(weight, fp8))
        _add_activation_quant(model, fp8)
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
    weight, and every Linear input but the LM head's is e4m3-quantized per token (also
    straight-through), so the training forward runs the fp8 engine's GEMMs. Reading the
    weight through the attribute (e.g. `get_output_embeddings().weight` in
    `sequence_logprobs`) sees it too. For precisions other than fp8_e2e it does nothing.
    Parametrizations and hooks are removed on exit, leaving the original parameters untouched."""
    check_precision(precision)
    if precision != "fp8_e2e":
        yield model
        return
    fp8 = FP8_DTYPES[precision]
    targets = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    done, hooks = [], []
    try:
        for module in targets:
            parametrize.register_parametrization(module, "weight", _STEFakeQuant(fp8), unsafe=True)
            done.append(module)
        hooks = _add_activation_quant(model, fp8)
        yield model
    finally:
        _remove_activation_quant(hooks)
        for module in reversed(done):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
