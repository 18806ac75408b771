"""DRPOGRPOTrainer: TRL 1.16's GRPOTrainer with a drpo loss, on a tiny random Llama on CPU.

The reference is computed independently of the trainer: a plain forward of the model on
the same batch (log-softmax of temperature-scaled logits, gathered at the completion
tokens) fed to `drpo.objectives.policy_loss`, and its parameter gradient."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")
from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer  # noqa: E402
from drpo.objectives import METRIC_NAMES, policy_loss  # noqa: E402
from trl_helpers import (  # noqa: E402
    AGG, METHOD, PARAMS, digit_reward, make_config, tiny_setup, tiny_trainer,
)


def reference_logps(model, inputs, temperature: float) -> torch.Tensor:
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    n = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -n - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]


class RecordingTrainer(DRPOGRPOTrainer):
    """Checks, at every loss call, the returned loss and its parameter gradient against the
    independent reference on the same batch and weights."""

    records: list

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        logp = reference_logps(model, inputs, self.temperature)
        old = inputs.get("old_per_token_logps")
        anchor = logp.detach() if old is None else old.double()
        ref, _ = policy_loss(
            METHOD,
            logp,
            anchor,
            inputs["advantages"].double(),
            inputs["completion_mask"],
            agg=AGG,
            horizon=self.args.max_completion_length,
            **PARAMS,
        )
        ref = ref / self.current_gradient_accumulation_steps
        params = [p for p in model.parameters() if p.requires_grad]
        got_grads = torch.autograd.grad(loss, params, retain_graph=True)
        ref_grads = torch.autograd.grad(ref, params)
        self.records.append(
            dict(
                loss=float(loss.detach()),
                ref=float(ref),
                grad_err=max(float((g.double() - r).abs().max()) for g, r in zip(got_grads, ref_grads)),
                grad_scale=max(float(r.abs().max()) for r in ref_grads),
                has_old=old is not None,
                max_shift=float(((logp.detach() - anchor).abs() * inputs["completion_mask"]).max()),
            )
        )
        return loss


@pytest.mark.slow
def test_two_trl_steps_optimize_the_drpo_loss(tmp_path):
    trainer = tiny_trainer(tmp_path, RecordingTrainer)
    model = trainer.model
    trainer.records = []
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()

    assert len(trainer.records) == 2
    for rec in trainer.records:
        assert rec["loss"] == pytest.approx(rec["ref"], rel=1e-5, abs=1e-7)
        assert rec["grad_scale"] > 0
        assert rec["grad_err"] <= 1e-5 * rec["grad_scale"] + 1e-8
    # Step 2 is off-policy: TRL's train-side anchor differs from the updated policy.
    assert trainer.records[1]["has_old"] and trainer.records[1]["max_shift"] > 1e-4
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(model.parameters(), before))

    logged = [entry for entry in trainer.state.log_history if "drpo/weight_mean" in entry]
    assert len(logged) == 2
    for entry in logged:
        for name in METRIC_NAMES:
            assert f"drpo/{name}" in entry, name
        assert entry["drpo/anchor_is_rollout"] == 0.0
        assert "entropy" in entry
    assert "reward" in logged[0]  # step 1 generated (step 2 reuses the rollout)
    # Step 1 is on-policy (ratio 1, weight 1); on step 2 DRPO's weights move off 1.
    assert logged[0]["drpo/ratio_max"] == pytest.approx(1.0) and logged[0]["drpo/weight_min"] == pytest.approx(1.0)
    assert logged[1]["drpo/weight_min"] < 1.0


def test_anchor_choice_and_rollout_nan_fallback(tmp_path):
    trainer = tiny_trainer(tmp_path, drpo_anchor="auto")
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.1, 0.2, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    old = logps - 0.1
    rollout = logps - 0.2
    rollout[0, 1] = float("nan")  # vLLM gave no log-prob for this token
    anchor, weights, metrics = trainer._anchor(
        {"old_per_token_logps": old, "sampling_per_token_logps": rollout, "importance_sampling_ratio": mask * 2.0},
        logps,
        mask,
    )
    expected = rollout.clone()
    expected[0, 1] = old[0, 1]
    torch.testing.assert_close(anchor, expected)
    # The rollout ratio already is the IS correction: only TRL's rejections (ratio 0) remain.
    torch.testing.assert_close(weights, (mask * 2.0 > 0).float())
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics == {"drpo/anchor_is_rollout": 1.0, "drpo/anchor_fallback_frac": pytest.approx(1 / 5)}

    trainer.args.drpo_anchor = "old"
    is_ratio = torch.full((2, 1), 1.5)
    anchor, weights, metrics = trainer._anchor(
        {"old_per_token_logps": old, "sampling_per_token_logps": rollout, "importance_sampling_ratio": is_ratio},
        logps,
        mask,
    )
    torch.testing.assert_close(anchor, old)
    assert weights is is_ratio
    anchor, weights, _ = trainer._anchor({}, logps, mask)  # TRL skipped old logps: on-policy
    torch.testing.assert_close(anchor, logps)

    trainer.args.drpo_anchor = "rollout"
    with pytest.raises(ValueError, match="sampling_per_token_logps"):
        trainer._anchor({"old_per_token_logps": old}, logps, mask)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(drpo_method="nope"), "unknown method 'nope'"),
        (dict(drpo_params={"detla": 1.0}), "'detla'"),
        (dict(drpo_params="{bad json"), "not valid JSON"),
        (dict(drpo_params={"delta": -1.0}), "'delta' must be > 0"),
        (dict(drpo_anchor="behaviour"), "drpo_anchor"),
        (dict(loss_type="sapo"), "loss_type='sapo'"),
        (dict(beta=0.04), "beta=0.04"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
    ],
)
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **overrides)


def test_json_params_and_trainer_needs_drpo_config(tmp_path):
    assert make_config(tmp_path, drpo_params='{"delta": 0.15}').drpo_params == {"delta": 0.15}
    from trl import TrlParser

    (cli,) = TrlParser(DRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none",
         "--drpo_method", "spo", "--drpo_params", '{"eps": 0.5}', "--loss_type", "grpo"]
    )
    assert (cli.drpo_method, cli.drpo_params, cli.loss_type) == ("spo", {"eps": 0.5}, "grpo")
    from trl import GRPOConfig

    tokenizer, model, data = tiny_setup()
    with pytest.raises(TypeError, match="DRPOConfig"):
        DRPOGRPOTrainer(
            model=model,
            reward_funcs=digit_reward,
            args=GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=data,
            processing_class=tokenizer,
        )


def test_compute_loss_on_a_handmade_ragged_batch(tmp_path):
    """Ragged completions (padded length 4 < max_completion_length 6), TRL's old log-probs
    and its vLLM IS ratio (anchor "old"), loss_type dr_grpo: each token's DRPO loss times the
    IS ratio, summed and divided by B * max_completion_length."""
    trainer = tiny_trainer(tmp_path, drpo_anchor="old")
    model, tokenizer = trainer.model, trainer.processing_class
    model.eval()  # eval mode: no gradient-accumulation normalizer
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, len(tokenizer), (3, 5), generator=g)
    prompt_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    completion_ids = torch.randint(3, len(tokenizer), (3, 4), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([0.7, -1.2, 0.4]))
    with torch.no_grad():
        base = reference_logps(model, inputs, 1.0).float()
    inputs["old_per_token_logps"] = (base + 0.3 * torch.randn(base.shape, generator=g)).clamp(max=-1e-3)
    inputs["importance_sampling_ratio"] = torch.tensor([[0.5], [1.0], [2.0]])

    loss = trainer._compute_loss(model, inputs)

    # Hand-written float64 reference: DRPO's -J per token, times the IS ratio, each sequence
    # summed and divided by max_completion_length (6), averaged over sequences.
    logp = reference_logps(model, inputs, 1.0)
    old = inputs["old_per_token_logps"].double()
    adv = inputs["advantages"].double()[:, None]
    r = torch.exp(logp - old)
    j = r * adv - adv.abs() * torch.exp(old) * (r - 1) ** 2 / (2 * PARAMS["delta"])
    per_token = -j * inputs["importance_sampling_ratio"].double() * completion_mask
    expected = (per_token.sum(-1) / 6).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)  # fp32 model vs fp64 reference
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True)
    ref = torch.autograd.grad(expected, params)
    scale = max(float(x.abs().max()) for x in ref)
    assert scale > 0
    assert max(float((a.double() - b).abs().max()) for a, b in zip(got, ref)) <= 1e-4 * scale
