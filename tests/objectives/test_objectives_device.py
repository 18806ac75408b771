"""Device-agnostic loss path and host synchronisations, provable on CPU.

Device: every tensor the loss path creates must live on its inputs' device. Redirecting the
factory functions (`torch.tensor`, `torch.zeros`, ...) to the "meta" device makes any tensor
created without `device=` land elsewhere than the CPU inputs, so mixing it with them raises,
exactly as a CPU-created fallback does next to CUDA inputs.

Host syncs: a TorchFunctionMode counts every device-to-host read (`item`, `tolist`,
`__bool__`, `__float__`, ...); on a GPU each one stalls the stream.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from drpo.objectives import AGG_MODES, METHODS, policy_loss

BUILTINS = sorted(m for m in METHODS if not m.startswith("test_"))


def _batch(adv_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 7, generator=g) * 3
    logp = (old + torch.randn(4, 7, generator=g) * 0.3).clamp(max=0)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1] = False  # a row with no response token
    mask[2, 4:] = False
    if adv_kind == "zero":
        adv = torch.zeros(4)
    elif adv_kind == "random":
        adv = torch.randn(4, generator=g)
    else:  # every token padding
        adv = torch.randn(4, generator=g)
        mask[:] = False
    return logp, old, adv, mask


@pytest.mark.parametrize("method", BUILTINS)
@pytest.mark.parametrize("adv_kind", ["zero", "random", "no_tokens"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_no_tensor_is_created_off_the_inputs_device(method, adv_kind, agg):
    logp, old, adv, mask = _batch(adv_kind)
    x = logp.clone().requires_grad_(True)
    weights = torch.rand(4, 7, generator=torch.Generator().manual_seed(1))
    for nonfinite in ("raise", "drop"):
        with torch.device("meta"):
            loss, metrics = policy_loss(method, x, old, adv, mask, agg=agg, token_weights=weights, nonfinite=nonfinite)
            (grad,) = torch.autograd.grad(loss, x)
        assert loss.device.type == "cpu" and grad.device.type == "cpu"
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(math.isfinite(v) for v in metrics.values())


# ------------------------------------------------------------------------ host syncs
SYNC_METHODS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__", "cpu"}


class CountHostSyncs(TorchFunctionMode):
    """Counts calls that copy a tensor's values to the host (and `nonzero`, whose output
    size depends on the values)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or name in ("nonzero", "masked_select", "unique") or (
            name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        ):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_sync():
    t = torch.ones(3)
    with CountHostSyncs() as c:
        bool(t.sum() > 0)
        t.sum().item()
        float(t.sum())
        t.tolist()
        t[t > 0]
        t.nonzero()
    assert c.calls == ["__bool__", "item", "__float__", "tolist", "__getitem__", "nonzero"]


@pytest.mark.parametrize("method", BUILTINS)
@pytest.mark.parametrize("nonfinite", ["raise", "drop"])
def test_one_host_sync_with_metrics(method, nonfinite):
    logp, old, adv, mask = _batch("random")
    weights = torch.rand(4, 7, generator=torch.Generator().manual_seed(1))
    x = logp.clone().requires_grad_(True)
    with CountHostSyncs() as c:
        loss, metrics = policy_loss(method, x, old, adv, mask, token_weights=weights, nonfinite=nonfinite)
        loss.backward()
    assert c.calls == ["tolist"], c.calls
    assert len(metrics) > 20


@pytest.mark.parametrize("method", BUILTINS)
def test_syncs_without_metrics(method):
    """Lenient (drop) or unvalidated: none. Strict: exactly one, the transfer of the check
    results a raise needs."""
    logp, old, adv, mask = _batch("random")
    for kwargs, expected in (
        (dict(nonfinite="drop"), []),
        (dict(nonfinite="raise", validate=False), []),
        (dict(nonfinite="raise"), ["tolist"]),
    ):
        x = logp.clone().requires_grad_(True)
        with CountHostSyncs() as c:
            loss, metrics = policy_loss(method, x, old, adv, mask, with_metrics=False, **kwargs)
            loss.backward()
        assert c.calls == expected, (kwargs, c.calls)
        assert metrics == {}
