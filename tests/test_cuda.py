"""The loss path, the log-prob engine, one `drpo train` step and one TRL step on a CUDA GPU
(`pytest -m cuda`; skipped where no GPU exists, see conftest.py). References are the same
computations on the CPU in fp32."""

from __future__ import annotations

import math

import pytest
import torch

from drpo.objectives import AGG_MODES, METHODS, policy_loss

pytestmark = pytest.mark.cuda
BUILTINS = sorted(m for m in METHODS if not m.startswith("test_"))
CUDA = torch.device("cuda")


def _batch(adv_kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(6, 33, generator=g) * 4
    logp = (old + torch.randn(6, 33, generator=g) * 0.3).clamp(max=0)
    mask = torch.rand(6, 33, generator=g) < 0.85
    mask[1] = False  # a row without response tokens
    adv = torch.zeros(6) if adv_kind == "zero" else torch.randn(6, generator=g)
    return logp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask


@pytest.mark.parametrize("method", BUILTINS)
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("adv_kind", ["zero", "random"])
def test_every_method_and_aggregation_with_bf16_inputs_on_cuda(method, agg, adv_kind):
    logp, old, adv, mask = _batch(adv_kind)
    x = logp.to(CUDA, copy=True).requires_grad_(True)
    weights = torch.rand(6, 33, generator=torch.Generator().manual_seed(3))
    loss, metrics = policy_loss(
        method, x, old.to(CUDA), adv.to(CUDA), mask.to(CUDA), agg=agg, token_weights=weights.to(CUDA)
    )
    loss.backward()
    assert loss.device == x.device and loss.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    y = logp.detach().float().requires_grad_(True)
    ref, ref_metrics = policy_loss(method, y, old.float(), adv.float(), mask, agg=agg, token_weights=weights)
    ref.backward()
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().float(), y.grad.bfloat16().float(), rtol=2e-2, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for k, v in ref_metrics.items():
        assert math.isclose(metrics[k], v, rel_tol=1e-4, abs_tol=1e-5), k


def test_nonfinite_drop_on_cuda():
    logp, old, adv, mask = _batch("random")
    old = old.to(CUDA)
    old[0, 0] = -math.inf
    mask[0, 0] = True
    x = logp.to(CUDA, copy=True).requires_grad_(True)
    loss, metrics = policy_loss("drpo", x, old, adv.to(CUDA), mask.to(CUDA), nonfinite="drop")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and metrics["nonfinite_tokens"] == 1


def test_token_logprobs_and_fused_policy_loss_on_cuda():
    from drpo.logprobs import fused_policy_loss, token_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 17, 32, generator=g)
    weight = torch.randn(101, 32, generator=g) * 0.3
    targets = torch.randint(0, 101, (3, 17), generator=g)
    old = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0] + 0.05
    old = old.clamp(max=0)
    adv = torch.randn(3, generator=g)
    mask = torch.rand(3, 17, generator=g) < 0.8
    ref_lp = token_logprobs(hidden, weight, targets)
    lp = token_logprobs(hidden.to(CUDA), weight.to(CUDA), targets.to(CUDA))
    torch.testing.assert_close(lp.cpu(), ref_lp, rtol=1e-4, atol=1e-4)
    h, w = hidden.to(CUDA, copy=True).requires_grad_(True), weight.to(CUDA, copy=True).requires_grad_(True)
    loss, metrics = fused_policy_loss("drpo", h, w, targets.to(CUDA), old.to(CUDA), adv.to(CUDA), mask.to(CUDA), delta=0.2)
    loss.backward()
    h_ref, w_ref = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ref, _ = fused_policy_loss("drpo", h_ref, w_ref, targets, old, adv, mask, delta=0.2)
    ref.backward()
    torch.testing.assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.grad.cpu(), h_ref.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w.grad.cpu(), w_ref.grad, rtol=1e-3, atol=1e-5)
    assert math.isfinite(metrics["kept_grad_mass"])


def test_one_drpo_train_step_on_cuda(tmp_path):
    from train_helpers import fast_config

    from drpo.train.loop import train
    from drpo.train.metrics import read_metrics

    cfg = fast_config(tmp_path, "train.steps=1", "train.eval_every=1", "train.device=cuda")
    summary = train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert summary["steps"] == 1 and math.isfinite(rows[-1]["objective/loss"])
    assert rows[-1]["objective/nonfinite_tokens"] == 0


@pytest.mark.slow
def test_one_trl_step_on_cuda(tmp_path):
    pytest.importorskip("trl")
    from trl_helpers import tiny_trainer

    trainer = tiny_trainer(tmp_path, use_cpu=False, max_steps=1)
    trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    logged = [e for e in trainer.state.log_history if "drpo/loss" in e]
    assert logged and math.isfinite(logged[0]["drpo/loss"])
