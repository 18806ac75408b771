"""Any drpo method as the loss of TRL's GRPOTrainer (trl >= 1.16).

    from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer
    args = DRPOConfig(output_dir="out", drpo_method="drpo", drpo_params={"delta": 12.5}, ...)
    trainer = DRPOGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

The subclass overrides `_compute_loss(model, inputs)`, TRL 1.16's extension point; TRL's
generation, rewards, group advantages, batching, accelerate/DeepSpeed and logging are kept.
Per step it computes the policy's token log-probs with TRL's own helper (logits divided by
the sampling temperature), picks the anchor, and calls `drpo.objectives.policy_loss`.

Anchor (`drpo_anchor`):
  "rollout"  the sampling engine's log-probs (`inputs["sampling_per_token_logps"]`, which
             TRL provides when generating with vLLM): the paper's default, mu = rollout
             policy. TRL's extra vLLM importance-sampling factor is then not applied: the
             ratio pi/mu already is that correction.
  "old"      TRL's train-side `old_per_token_logps` (computed when num_iterations > 1 or
             generation and optimizer steps are misaligned, else the current log-probs
             detached, i.e. on-policy). With vLLM, TRL's `importance_sampling_ratio` then
             multiplies each token's loss, as in GRPOTrainer.
  "auto"     (default) "rollout" when TRL provides rollout log-probs, else "old".
Tokens whose rollout log-prob vLLM could not return (NaN) use the "old" anchor instead;
their share is logged as `drpo/anchor_fallback_frac`.

Aggregation is `drpo_agg` (drpo's names: token-mean, seq-mean-token-sum,
seq-mean-token-mean, seq-mean-token-sum-norm with horizon `max_completion_length`), per
micro-batch, divided by the gradient-accumulation steps in training (as TRL's "bnpo" /
"grpo" / "dr_grpo" losses are); TRL's `loss_type` is not used. TRL features that would add
terms outside the drpo objective (beta KL, entropy bonus, entropy masking, off-policy
masking, sequence-level importance sampling) are rejected by `DRPOConfig` rather than
silently dropped.

Logged through TRL's metrics (`trainer.state.log_history`, TensorBoard/W&B via report_to):
every drpo diagnostic as `drpo/<name>` (see `drpo.objectives.METRIC_NAMES`), plus TRL's
`entropy`, `drpo/anchor_is_rollout` and `drpo/anchor_fallback_frac`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from drpo.objectives import AGG_MODES, METRIC_NAMES, check_token_weights, get_method, policy_loss

ANCHORS = ("auto", "rollout", "old")


@dataclass
class DRPOConfig(GRPOConfig):
    """GRPOConfig plus the drpo objective. `drpo_params` may be a dict or a JSON string."""

    drpo_method: str = field(default="drpo", metadata={"help": "drpo method name (drpo.objectives.METHODS)."})
    # `dict | str | None` so HfArgumentParser / TrlParser read it from the command line as a JSON string.
    drpo_params: dict[str, Any] | str | None = field(
        default_factory=dict, metadata={"help": 'Method parameters, e.g. {"delta": 12.5} (dict or JSON).'}
    )
    drpo_anchor: str = field(default="auto", metadata={"help": "Anchor log-probs: auto, rollout or old."})
    drpo_agg: str = field(default="token-mean", metadata={"help": f"Loss aggregation: {', '.join(AGG_MODES)}."})

    def __post_init__(self):
        super().__post_init__()
        if self.drpo_params is None:
            self.drpo_params = {}
        if isinstance(self.drpo_params, str):
            try:
                self.drpo_params = json.loads(self.drpo_params) if self.drpo_params.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"`drpo_params` is not valid JSON: {self.drpo_params!r} ({err})") from None
        if not isinstance(self.drpo_params, dict):
            raise ValueError(f"`drpo_params` must be a dict of parameter -> value, got {self.drpo_params!r}")
        get_method(self.drpo_method).resolve_params(self.drpo_params)  # unknown names / bad values raise here
        if self.drpo_anchor not in ANCHORS:
            raise ValueError(f"`drpo_anchor` must be one of {', '.join(ANCHORS)}, got {self.drpo_anchor!r}")
        if self.drpo_agg not in AGG_MODES:
            raise ValueError(f"`drpo_agg` must be one of {', '.join(AGG_MODES)}, got {self.drpo_agg!r}")
        unsupported = {
            "beta": (self.beta, 0.0),
            "entropy_coef": (self.entropy_coef, 0.0),
            "top_entropy_quantile": (self.top_entropy_quantile, 1.0),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold, None),
            "importance_sampling_level": (self.importance_sampling_level, "token"),
        }
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(
                    f"DRPOConfig does not support `{name}={value!r}` (it would add terms outside the drpo "
                    f"objective); leave it at {supported!r}"
                )
        if getattr(self, "use_adaptive_entropy", False):
            raise ValueError("DRPOConfig does not support `use_adaptive_entropy=True` (no entropy bonus)")


class DRPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is a drpo objective (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, DRPOConfig):
            raise TypeError(f"DRPOGRPOTrainer needs `args` to be a DRPOConfig, got {type(config).__name__}")
        super().__init__(*args, **kwargs)
        self.drpo_params = get_method(config.drpo_method).resolve_params(config.drpo_params)

    # ---------------------------------------------------------------- stages of one loss call
    def _policy_logps(self, model, inputs: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Current policy log-probs and entropies of the completion tokens, and their mask."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        return logps, entropies, mask

    def _anchor(self, inputs: dict, logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        """(anchor log-probs, extra per-token loss weight or None, anchor metrics)."""
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        rollout = inputs.get("sampling_per_token_logps")
        choice = self.args.drpo_anchor
        if choice == "rollout" and rollout is None:
            raise ValueError(
                "drpo_anchor='rollout' but TRL provided no rollout log-probs (`sampling_per_token_logps`; "
                "TRL 1.16 returns them when generating with vLLM); use drpo_anchor='old' or 'auto'"
            )
        if rollout is not None and choice in ("auto", "rollout"):
            missing = torch.isnan(rollout) & (mask != 0)
            anchor = torch.where(torch.isnan(rollout), old, rollout)
            fallback = float(missing.sum()) / max(float((mask != 0).sum()), 1.0)
            return anchor, None, {"drpo/anchor_is_rollout": 1.0, "drpo/anchor_fallback_frac": fallback}
        weights = inputs.get("importance_sampling_ratio")  # TRL's vLLM correction, for the "old" anchor
        return old, weights, {"drpo/anchor_is_rollout": 0.0, "drpo/anchor_fallback_frac": 0.0}

    def _log_metrics(self, mode: str, metrics: dict[str, float], entropies: Tensor, mask: Tensor) -> None:
        # One gather for all diagnostics (mean over processes), like GRPOTrainer's own metrics.
        names = list(metrics)
        values = torch.tensor([metrics[k] for k in names], dtype=torch.float64, device=entropies.device)
        values = self.accelerator.gather(values[None]).nanmean(0).tolist()
        for name, value in zip(names, values):
            self._metrics[mode][name].append(value)
        m = mask.float()
        totals = self.accelerator.reduce(torch.stack([(entropies * m).sum(), m.sum()]), reduction="sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        logps, entropies, mask = self._policy_logps(model, inputs)
        anchor, weights, anchor_metrics = self._anchor(inputs, logps, mask)
        if weights is not None:
            check_token_weights(weights, mask, "importance_sampling_ratio")
        loss, diag = policy_loss(
            self.args.drpo_method,
            logps,
            anchor,
            inputs["advantages"],
            mask,
            agg=self.args.drpo_agg,
            horizon=self.max_completion_length,
            token_weights=weights,
            **self.drpo_params,
        )
        metrics = {f"drpo/{k}": diag[k] for k in METRIC_NAMES} | {"drpo/loss": float(loss.detach())}
        self._log_metrics(mode, metrics | anchor_metrics, entropies, mask)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss / normalizer
