"""Any drpo method as the loss of TRL's GRPOTrainer (trl >= 1.16), a drop-in for GRPOTrainer.

    from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer
    args = DRPOConfig(output_dir="out", drpo_method="drpo", drpo_params={"delta": 12.5}, ...)
    trainer = DRPOGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds)
    trainer.train()

The subclass overrides only `_compute_loss(model, inputs)`, TRL 1.16's extension point, and
keeps what surrounds TRL's per-token loss: TRL's forward (every model input TRL's `_compute_loss`
passes: multimodal tensors, tool masks; logits over the sampling temperature), its `loss_type`
normalisation ("dapo", "bnpo", "dr_grpo", "grpo") with its gradient-accumulation scaling, the MoE
router aux loss and its vLLM importance-sampling correction. With drpo_method="grpo" and the same
clip range the loss equals GRPOTrainer's. The contract in full, in docs/integrations.md ("Use with
TRL"): the anchor (`drpo_anchor`: "rollout" = vLLM's `sampling_per_token_logps`, the paper's mu;
"old" = TRL's `old_per_token_logps`; "auto"), the GRPOConfig fields refused because the drpo loss
would ignore them or add a term outside it, non-finite tokens (dropped and counted in
`drpo/nonfinite_tokens`, as TRL's loss carries on past them; `drpo_params={"strict": True}`
raises), and the metrics (`drpo/<name>`, reduced over processes as TRL reduces its own). The
opt-in rollout dumps for `drpo inspect` (`drpo_dump_dir`, `drpo_dump_every`): docs/inspect.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from drpo.integrations import split_drpo_params
from drpo.objectives import METRIC_NAMES, get_method, policy_loss

ANCHORS = ("auto", "rollout", "old")
STRICT_NAME = "`drpo_params['strict']`"
# TRL loss types that are normalisations of a per-token loss; TRL's others are objectives.
LOSS_TYPES = ("dapo", "bnpo", "dr_grpo", "grpo")
# Model inputs TRL 1.16's `_compute_loss` hands to `_get_per_token_logps_and_entropies`.
FORWARD_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                  "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# drpo diagnostics that count tokens (summed over processes when logged).
COUNT_METRICS = ("tokens", "nonfinite_tokens")
_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def metric_reduction(name: str) -> str:
    """How a logged metric is reduced over processes, as GRPOTrainer reduces its own: counts
    summed (TRL's `num_tokens`), per-process extremes by nanmin/nanmax (TRL's `clip_ratio/low_min`,
    `sampling/importance_sampling_ratio/max`), everything else by nanmean (TRL's `policy_loss`,
    `aux_loss`). TRL then averages each key over the loss calls of the logging window."""
    base = name.rsplit("/", 1)[-1]
    if base in COUNT_METRICS:
        return "sum"
    if base.endswith("_min"):
        return "min"
    if base.endswith("_max"):
        return "max"
    return "mean"


def _nan_extreme(x: Tensor, largest: bool) -> Tensor:
    # TRL's nanmin/nanmax (NaN when every value is NaN), without boolean indexing.
    nan = torch.isnan(x)
    fill = -torch.inf if largest else torch.inf
    kept = torch.where(nan, fill, x)
    return torch.where(nan.all(), torch.nan, kept.amax() if largest else kept.amin())


_REDUCE = {
    "sum": torch.nansum,
    "mean": torch.nanmean,
    "min": lambda x: _nan_extreme(x, largest=False),
    "max": lambda x: _nan_extreme(x, largest=True),
}


def _refused_fields(config: "DRPOConfig") -> dict[str, str]:
    """GRPOConfig field -> what to do instead, for fields that would change nothing or add
    terms outside the drpo objective. Checked only where the value differs from TRL's default."""
    numeric = [k for k, v in get_method(config.drpo_method).params.items() if not isinstance(v, bool)]
    params = ", ".join(f'"{k}": ...' for k in numeric)
    own = f"set the drpo method's parameters instead: drpo_params={{{params}}} (drpo_method={config.drpo_method!r})"
    outside = "it would add a term outside the drpo objective; leave it at TRL's default"
    if config.drpo_method == "grpo":  # TRL's cap on the unclipped ratio is the dual clip (A < 0)
        two_sided = f'TRL\'s two-sided clip is drpo\'s `dual_clip`: set drpo_params={{"dual_clip": {config.delta!r}}}'
    else:
        two_sided = f"TRL's two-sided clip is not DRPO's delta (a Binary-TV threshold); {own}"
    return {
        "epsilon": f"TRL's clip range is not read by the drpo loss; {own}",
        "epsilon_high": f"TRL's clip range is not read by the drpo loss; {own}",
        "delta": two_sided,
        "beta": outside,
        "entropy_coef": outside,
        "use_adaptive_entropy": outside,
        "top_entropy_quantile": outside,
        "off_policy_mask_threshold": outside,
        "importance_sampling_level": "sequence-level IS is a different objective; leave it at 'token'",
    }


def _rollout_is_conflict(mode: str) -> str | None:
    if mode in ("token_truncate", "sequence_truncate"):
        return (
            f"vllm_importance_sampling_mode={mode!r} multiplies the loss by a truncated pi_old/mu ratio, which "
            "the rollout anchor (pi/mu) already contains; use a '*_mask' mode (its rejections are kept), "
            "vllm_importance_sampling_correction=False, or drpo_anchor='old'"
        )
    return None


@dataclass
class DRPOConfig(GRPOConfig):
    """GRPOConfig plus the drpo objective. `drpo_params` may be a dict or a JSON string."""

    drpo_method: str = field(default="drpo", metadata={"help": "drpo method name (drpo.objectives.METHODS)."})
    # `dict | str | None` so HfArgumentParser / TrlParser read it from the command line as a JSON string.
    drpo_params: dict[str, Any] | str | None = field(
        default_factory=dict, metadata={"help": 'Method parameters, e.g. {"delta": 12.5} (dict or JSON).'}
    )
    drpo_anchor: str = field(default="auto", metadata={"help": "Anchor log-probs: auto, rollout or old."})
    drpo_dump_dir: str | None = field(default=None, metadata={"help": "Write rollout dumps for `drpo inspect` here."})
    drpo_dump_every: int = field(default=1, metadata={"help": "Dump every N optimizer steps (with drpo_dump_dir)."})

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
        params, _ = split_drpo_params(self.drpo_params, STRICT_NAME)
        get_method(self.drpo_method).resolve_params(params)  # bad names/values raise
        if not isinstance(self.drpo_dump_every, int) or self.drpo_dump_every < 1:
            raise ValueError(f"`drpo_dump_every` must be an integer >= 1, got {self.drpo_dump_every!r}")
        if self.drpo_anchor not in ANCHORS:
            raise ValueError(f"`drpo_anchor` must be one of {', '.join(ANCHORS)}, got {self.drpo_anchor!r}")
        if self.loss_type not in LOSS_TYPES:
            hint = "; for TRL's CISPO use drpo_method='cispo'" if self.loss_type == "cispo" else ""
            raise ValueError(
                f"DRPOConfig does not support `loss_type={self.loss_type!r}`: it is a TRL objective, not a "
                f"normalisation of the drpo loss; use one of {', '.join(LOSS_TYPES)}{hint}"
            )
        for name, instead in _refused_fields(self).items():
            value = getattr(self, name)
            if value != _GRPO_DEFAULTS[name]:
                raise ValueError(f"DRPOConfig does not support `{name}={value!r}`: {instead}")
        if self.use_vllm and self.vllm_importance_sampling_correction and self.drpo_anchor != "old":
            conflict = _rollout_is_conflict(self.vllm_importance_sampling_mode)
            if conflict:
                raise ValueError(f"drpo_anchor={self.drpo_anchor!r} (the vLLM rollout log-probs) with {conflict}")


class DRPOGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is a drpo objective (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, DRPOConfig):
            raise TypeError(f"DRPOGRPOTrainer needs `args` to be a DRPOConfig, got {type(config).__name__}")
        super().__init__(*args, **kwargs)
        params, self.nonfinite = split_drpo_params(config.drpo_params, STRICT_NAME)
        self.drpo_params = get_method(config.drpo_method).resolve_params(params)
        self._dumper = None
        if config.drpo_dump_dir:
            from drpo.dumps import DumpWriter

            self._dumper = DumpWriter(config.drpo_dump_dir, every=config.drpo_dump_every, metadata=self._dump_metadata())

    # ---------------------------------------------------------------- rollout dumps (opt-in)
    def _dump_metadata(self) -> dict[str, Any]:
        a = self.args
        return {
            "source": "trl",
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", None),
            "tokenizer": getattr(self.processing_class, "name_or_path", None),
            "method": a.drpo_method,
            "params": self.drpo_params,
            "anchor": a.drpo_anchor,
            "sampling": {"temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k, "use_vllm": a.use_vllm,
                         "num_generations": a.num_generations, "loss_type": a.loss_type},
            "columns": {
                "logp_rollout": "vLLM's log-prob of the sampled token (TRL's sampling_per_token_logps; NaN: not "
                                "scored); null without vLLM",
                "logp_before": "TRL's old_per_token_logps (train-side, before this generation batch's updates) when "
                               "TRL computed them, else the current log-prob (on-policy: the same)",
                "logp_after": "the current log-prob at this loss call (after the optimizer steps already taken on "
                              "this generation batch); null when TRL computed no old log-probs",
                "entropy": "TRL's per-token entropy of the current policy",
            },
        }

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self._dumper is not None and self.model.training:
            # Row of each completion in the process-wide generation batch (TRL's groups are
            # num_generations consecutive rows); it travels through TRL's shuffle and split.
            n = out["completion_ids"].size(0)
            start = self.accelerator.process_index * n
            out["drpo_dump_index"] = torch.arange(start, start + n, device=out["completion_ids"].device)
        return out

    def _dump(self, inputs: dict, logps: Tensor, entropies: Tensor, mask: Tensor) -> None:
        step = self.state.global_step
        if self._dumper is None or "drpo_dump_index" not in inputs or not self._dumper.due(step):
            return
        old = inputs.get("old_per_token_logps")
        index = inputs["drpo_dump_index"].cpu()
        self._dumper.write(
            step=step, response_mask=mask != 0, token_ids=inputs["completion_ids"], entropy=entropies,
            logp_rollout=inputs.get("sampling_per_token_logps"), logp_before=logps if old is None else old,
            logp_after=None if old is None else logps, advantage=inputs["advantages"],
            sample_id=index, group_id=index // self.num_generations,
        )

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._dumper is not None:
                self._dumper.close()  # the shard's footer; a later train() writes a new shard

    # ---------------------------------------------------------------- stages of one loss call
    def _policy_logps(self, model, inputs: dict) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Current policy log-probs and entropies of the completion tokens, the MoE aux loss
        (None unless enabled), and the loss mask, exactly as GRPOTrainer computes them."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **{name: inputs.get(name) for name in FORWARD_INPUTS})
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        return logps, entropies, aux_loss, mask

    def _anchor(self, inputs: dict, logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """(anchor log-probs, per-token loss weight or None, anchor metrics as device scalars)."""
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        rollout = inputs.get("sampling_per_token_logps")
        is_ratio = inputs.get("importance_sampling_ratio")  # TRL's vLLM correction, (B, T) or (B, 1)
        choice = self.args.drpo_anchor
        if choice == "rollout" and rollout is None:
            raise ValueError(
                "drpo_anchor='rollout' but TRL provided no rollout log-probs (`sampling_per_token_logps`; "
                "TRL 1.16 returns them when generating with vLLM); use drpo_anchor='old' or 'auto'"
            )
        zero = logps.new_zeros(())
        if rollout is None or choice == "old":
            return old, is_ratio, {"drpo/anchor_is_rollout": zero, "drpo/anchor_fallback_frac": zero}
        weights = None
        if is_ratio is not None:
            conflict = _rollout_is_conflict(self.vllm_importance_sampling_mode)
            if conflict:
                raise ValueError(f"drpo_anchor={choice!r} with {conflict}")
            weights = (is_ratio > 0).to(logps.dtype)  # keep TRL's "*_mask" rejections, not its ratio
        # vLLM marks tokens it could not score with NaN; TRL gives them IS ratio 1, i.e. trains
        # them against its train-side log-probs. So do we (other non-finite values are dropped).
        unscored = torch.isnan(rollout)
        anchor = torch.where(unscored, old, rollout)
        on = mask != 0
        fallback = (unscored & on).sum() / on.sum().clamp(min=1)
        return anchor, weights, {"drpo/anchor_is_rollout": zero + 1.0, "drpo/anchor_fallback_frac": fallback}

    def _normalised_loss(
        self, logps: Tensor, anchor: Tensor, inputs: dict, mask: Tensor, weights: Tensor | None, mode: str
    ) -> tuple[Tensor, dict[str, float]]:
        """The drpo per-token loss reduced as TRL's `loss_type` reduces its own (the sum over
        response tokens divided by TRL's count), scaled for gradient accumulation as TRL does."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "bnpo":  # local response tokens
            agg, normalizer = "token-mean", None
        elif self.loss_type == "grpo":  # per-sequence means, averaged over all B rows (empty ones too)
            agg, normalizer = "seq-mean-token-mean", mask.size(0)
        elif self.loss_type == "dr_grpo":
            agg, normalizer = "token-mean", mask.size(0) * self.max_completion_length
        else:  # dapo: `num_items_in_batch` counts the whole generation batch over all processes
            agg = "token-mean"
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":  # already spans the accumulation window
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                accumulation = 1.0
        loss, diag = policy_loss(self.args.drpo_method, logps, anchor, inputs["advantages"], mask, agg=agg,
                                 normalizer=normalizer, token_weights=weights, nonfinite=self.nonfinite,
                                 **self.drpo_params)
        return loss / accumulation, diag

    def _log_metrics(self, mode: str, metrics: dict[str, Any], entropies: Tensor, mask: Tensor) -> None:
        # Each diagnostic reduced over processes as TRL reduces its own (`metric_reduction`), and
        # TRL's token-weighted entropy, read to the host in one transfer.
        names = list(metrics)
        device = entropies.device
        values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64, device=device) for k in names])
        gathered = self.accelerator.gather(values[None])  # [processes, metrics]
        values = torch.stack([_REDUCE[metric_reduction(k)](gathered[:, i]) for i, k in enumerate(names)])
        m = mask.float()
        totals = self.accelerator.reduce(torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum")
        entropy = (totals[0] / totals[1].clamp(min=1.0)).to(torch.float64)
        for name, value in zip([*names, "entropy"], torch.cat([values, entropy[None]]).tolist()):
            self._metrics[mode][name].append(value)

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        logps, entropies, aux_loss, mask = self._policy_logps(model, inputs)
        anchor, weights, anchor_metrics = self._anchor(inputs, logps, mask)
        loss, diag = self._normalised_loss(logps, anchor, inputs, mask, weights, mode)
        # drpo/loss: before the accumulation scaling, like TRL's `policy_loss` metric.
        metrics = {f"drpo/{k}": diag[k] for k in (*METRIC_NAMES, "loss")}
        if aux_loss is not None:  # as GRPOTrainer: router load-balancing loss, scaled for accumulation
            accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            metrics["aux_loss"] = aux_loss.detach()
        self._log_metrics(mode, metrics | anchor_metrics, entropies, mask)
        if mode == "train":
            self._dump(inputs, logps, entropies, mask)
        return loss
