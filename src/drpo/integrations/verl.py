"""Every drpo method as a verl policy loss (verl >= 0.9.1). The contract in full, with what was
checked against verl's own losses: docs/integrations.md ("Use with verl").

Importing this module registers each method in `drpo.objectives.METHODS` into verl's policy-loss
registry, so `actor_rollout_ref.actor.policy_loss.loss_mode=drpo` selects one. verl imports it in
every process that does `import verl` (driver and Ray workers) through the entry point
`drpo = "drpo.integrations.verl"` in the group `verl.plugins` (or with
`VERL_USE_EXTERNAL_MODULES=drpo.integrations.verl`). verl swallows plugin import errors (it logs
them at DEBUG), so check with `python -c "import verl; from verl.trainer.ppo.core_algos import
get_policy_loss_fn; get_policy_loss_fn('drpo')"`.

- Names: a method keeps its drpo name unless verl ships a loss under it (verl 0.9.1: dppo_tv,
  dppo_kl, cispo), then it is `drpo_<name>`; `VERL_LOSS_NAMES` maps drpo method -> loss_mode.
- Parameters, later wins: drpo's defaults; verl's actor keys where a parameter is the quantity
  one of verl's own losses reads, read as that loss reads them (`VERL_CLIP_KEYS`, verl's
  fallbacks), so a verl user gets verl's numbers; `policy_loss.drpo_params`, which needs
  `policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig` (verl's PolicyLossConfig
  rejects unknown keys). Its key `strict` is no method parameter: see non-finite inputs.
- Non-finite inputs: as verl's own losses carry on past them, such a response token is dropped
  and counted in `actor/drpo/nonfinite_tokens`, with no extra host sync (`nonfinite="drop"`);
  `drpo_params: {strict: true}` raises instead, naming the argument.
- Aggregation: `loss_agg_mode` maps 1:1 to `drpo.objectives.aggregate`, divided by verl's
  global mini-batch counts (`config.global_batch_info`) as verl's `agg_loss` is, so gradient
  accumulation and data parallelism give the mini-batch mean.
- Loss value: a loss mode with a twin among verl's losses returns the twin's value as well as its
  gradient (verl writes its dppo losses as -A*sg(w)*log pi: `_verl_value_form`).
- `rollout_is_weights` multiply the per-token loss before aggregation; the diagnostics
  (`actor/drpo/<metric>`, per loss call; verl logs their mean over micro-batches and ranks) are
  those of the unweighted tokens.
- Bypass mode: verl's bypass loss applies the rejection sampling of `policy_loss.
  rollout_correction` inside the loss; so does this plugin (`_bypass_rejection`). verl does not
  copy `algorithm.rollout_correction` into the actor config, so the driver refuses a config that
  would silently skip it (`install_config_check`).
- Rollout dumps for `drpo inspect` (opt-in, docs/inspect.md): the driver's batch after its
  advantage step (`DRPO_VERL_DUMP_DIR`, `DRPO_VERL_DUMP_EVERY`) and every N-th loss call of each
  worker (`policy_loss.drpo_dump: {dir, every}`). Each dump is closed at once (a complete shard
  per batch): Ray ends workers without exit hooks.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
from verl.workers.config import PolicyLossConfig

from drpo.integrations import split_drpo_params
from drpo.objectives import METHODS, Method, get_method, policy_loss, ratio

logger = logging.getLogger(__name__)

METRIC_PREFIX = "actor/drpo/"
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# drpo parameter <- verl actor-config key, for parameters that are the same quantity as
# the keys verl's own vanilla / cispo / dppo_* losses read.
VERL_CLIP_KEYS: Mapping[str, Mapping[str, str]] = {
    "grpo": {"eps_low": "clip_ratio_low", "eps_high": "clip_ratio_high", "dual_clip": "clip_ratio_c"},
    "cispo": {"eps_low": "clip_ratio_low", "eps_high": "clip_ratio_high"},
    "dppo_tv": {"delta_low": "clip_ratio_low", "delta_high": "clip_ratio_high", "ratio_cap": "clip_ratio_c"},
    "dppo_kl": {"delta_low": "clip_ratio_low", "delta_high": "clip_ratio_high", "ratio_cap": "clip_ratio_c"},
}
# verl's fallback for a config without clip_ratio_c: `config.get("clip_ratio_c", 3.0)` in its
# vanilla loss, 20.0 in its dppo losses.
_CLIP_RATIO_C_FALLBACK = {"grpo": 3.0, "dppo_tv": 20.0, "dppo_kl": 20.0}

# The drpo methods whose verl twin (`dppo_tv`, `dppo_kl`) writes its loss as -A * sg(M * min(r, c))
# * log pi: drpo's surrogate M * sg(min(r, c) / r) * r * A has the same gradient, another value;
# their verl loss reports the twin's value (`_verl_value_form`). grpo's value is vanilla's, and
# cispo's objective already is verl's form sg(clip(r)) * A * log pi.
_LOG_PI_VALUE = ("dppo_tv", "dppo_kl")

# drpo method name -> the verl loss_mode it is registered under (filled by register_all).
VERL_LOSS_NAMES: dict[str, str] = {}
STRICT_NAME = "actor.policy_loss.drpo_params.strict"


@dataclass
class DRPOPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus `drpo_params`: the drpo method's parameters by name
    (and `strict`, see the module docstring)."""

    drpo_params: dict[str, Any] = field(default_factory=dict)
    drpo_dump: dict[str, Any] = field(default_factory=dict)  # {dir, every}: see the module docstring


def _get(config: Any, key: str, default: Any = None) -> Any:
    # verl hands losses either its ActorConfig dataclass or an OmegaConf DictConfig.
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _verl_value(config: Any, method: str, key: str) -> Any:
    value = _get(config, key)
    if value is None and key in ("clip_ratio_low", "clip_ratio_high"):
        return _get(config, "clip_ratio")
    if value is None and key == "clip_ratio_c":
        return _CLIP_RATIO_C_FALLBACK[method]
    return value


def _drpo_params(config: Any) -> dict[str, Any]:
    raw = _get(_get(config, "policy_loss"), "drpo_params")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        try:  # OmegaConf DictConfig
            from omegaconf import OmegaConf

            raw = OmegaConf.to_container(raw, resolve=True)
        except Exception:
            pass
    if not isinstance(raw, Mapping):
        raise ValueError(f"actor.policy_loss.drpo_params must be a mapping of parameter -> value, got {raw!r}")
    return dict(raw)


def strict_mode(config: Any) -> bool:
    """`policy_loss.drpo_params.strict`: raise on non-finite inputs instead of dropping them."""
    return split_drpo_params(_drpo_params(config), STRICT_NAME)[1] == "raise"


def method_params(method: str, config: Any) -> dict[str, Any]:
    """The parameters a verl run gives `method`: drpo defaults, overridden by verl's actor
    keys where they mean the same thing, overridden by `policy_loss.drpo_params`."""
    m = get_method(method)
    params: dict[str, Any] = {}
    for param, key in VERL_CLIP_KEYS.get(method, {}).items():
        value = _verl_value(config, method, key)
        if value is not None:
            params[param] = value
    params.update(split_drpo_params(_drpo_params(config), STRICT_NAME)[0])
    try:
        return m.resolve_params(params)
    except ValueError as err:
        raise ValueError(f"verl actor config for drpo method {method!r}: {err}") from None


def _horizon(config: Any, info: Mapping[str, Any]) -> int | None:
    factor = info.get("loss_scale_factor")
    if factor is None:
        factor = _get(config, "loss_scale_factor")
    if factor is None:
        return None  # drpo's default, like verl's: the padded response length
    if isinstance(factor, bool) or not float(factor).is_integer() or factor <= 0:
        raise ValueError(f"actor.loss_scale_factor must be a positive integer, got {factor!r}")
    return int(factor)


def _normalizer(agg: str, info: Mapping[str, Any]) -> Any:
    """What verl's agg_loss divides the micro-batch sum by: the global token (token-mean) or
    sequence (seq-mean-*) count / dp_size; None (the local count) without global info."""
    dp_size = info.get("dp_size") or 1
    if agg == "token-sum":
        return 1.0 / dp_size
    total = info.get("batch_num_tokens") if agg == "token-mean" else info.get("global_batch_size")
    if total is None:
        if dp_size > 1:
            raise ValueError(f"verl global_batch_info has dp_size={dp_size} but no global count for {agg!r}")
        return None
    return total / dp_size


def _bypass_rejection(config: Any, log_prob: Tensor, old_log_prob: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    """verl's bypass-mode rejection sampling (see the module docstring): (mask, metrics)."""
    rc = _get(_get(config, "policy_loss"), "rollout_correction")
    if rc is None or not _get(rc, "bypass_mode", False):
        return mask, {}
    key = "actor.policy_loss.rollout_correction"
    if _get(rc, "loss_type", "ppo_clip") != "ppo_clip":
        raise ValueError(
            f"{key}.loss_type={_get(rc, 'loss_type')!r} is verl's own REINFORCE loss; drpo losses run in bypass "
            "mode only with loss_type 'ppo_clip'"
        )
    if _get(rc, "rollout_is") is not None:
        raise ValueError(
            f"{key}.rollout_is={_get(rc, 'rollout_is')!r}: in bypass mode old_log_prob is the rollout log-prob, so "
            "drpo's ratio already corrects for the rollout policy (verl's ppo_clip bypass loss does not apply IS "
            "weights either); set it to null"
        )
    if _get(rc, "rollout_rs") is None:
        return mask, {}
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    with torch.no_grad():
        _, mask, metrics = compute_rollout_correction_and_rejection_mask(
            old_log_prob=log_prob,
            rollout_log_prob=old_log_prob,
            response_mask=mask,
            rollout_is=None,
            rollout_rs=_get(rc, "rollout_rs"),
            rollout_rs_threshold=_get(rc, "rollout_rs_threshold"),
        )
    return mask, metrics


def _verl_value_form(m: Method) -> Method:
    """`m` valued as verl writes its dppo losses: per token sg(dJ/dlogp * log pi), with
    dJ/dlogp = A * r * w, plus J - sg(J), which is exactly 0 and carries exactly J's gradient.
    So the one policy_loss call gives verl's value over the same tokens, IS weights and
    aggregation as drpo's gradient, and drpo's diagnostics (weight, boundary are m's)."""

    def objective(logp, old_logp, adv, **params):
        j, penalty = m.objective(logp, old_logp, adv, **params)
        with torch.no_grad():
            value = adv * ratio(logp, old_logp) * m.weight(logp, old_logp, adv, **params) * logp
        return value + (j - j.detach()), penalty

    return replace(m, objective=objective)


def compute_policy_loss(
    method: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """verl's policy-loss contract for drpo `method`: returns (loss, metrics)."""
    if config is None:
        raise ValueError(f"drpo loss {method!r}: verl must pass the actor config (`config`), got None")
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; verl's modes are {', '.join(VERL_AGG_MODES)}")
    params = method_params(method, config)
    nonfinite = "raise" if strict_mode(config) else "drop"
    info = _get(config, "global_batch_info") or {}
    horizon = _horizon(config, info)
    mask, rc_metrics = _bypass_rejection(config, log_prob, old_log_prob, response_mask)
    m = _verl_value_form(get_method(method)) if method in _LOG_PI_VALUE else method
    try:
        loss, metrics = policy_loss(m, log_prob, old_log_prob, advantages, mask, horizon=horizon,
                                    agg="token-mean" if loss_agg_mode == "token-sum" else loss_agg_mode,
                                    normalizer=_normalizer(loss_agg_mode, info),
                                    token_weights=rollout_is_weights, nonfinite=nonfinite, **params)
    except ValueError as err:
        raise ValueError(
            f"drpo loss {method!r} (verl's log_prob, old_log_prob, rollout_is_weights are drpo's logp, old_logp, "
            f"token_weights): {err}"
        ) from None
    dump_in_loss(method, params, config, old_log_prob, log_prob, advantages, mask)
    return loss, {METRIC_PREFIX + k: v for k, v in metrics.items() if k != "loss"} | rc_metrics


# ---------------------------------------------------------------- rollout dumps (opt-in)
# One writer and loss-call count per process and directory: the loss function is stateless
# and verl re-creates nothing we could hang them on.
_LOSS_DUMPS: dict[str, list] = {}


def _dump_settings(config: Any) -> tuple[str, int] | None:
    raw = _get(_get(config, "policy_loss"), "drpo_dump")
    if not raw:
        return None
    if not isinstance(raw, Mapping):
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(raw, resolve=True)
    unknown = sorted(set(raw) - {"dir", "every"})
    every = raw.get("every", 1)
    if unknown or not raw.get("dir") or isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"actor.policy_loss.drpo_dump must be {{dir: <path>, every: <int >= 1>}}, got {dict(raw)!r}")
    return str(raw["dir"]), every


def dump_in_loss(method: str, params: dict, config: Any, old_log_prob: Tensor, log_prob: Tensor,
                 advantages: Tensor, mask: Tensor) -> None:
    """The worker-side dump (see the module docstring); a no-op unless `drpo_dump` is set."""
    settings = _dump_settings(config)
    if settings is None:
        return
    from drpo.dumps import DumpWriter

    directory, every = settings
    bypass = bool(_get(_get(_get(config, "policy_loss"), "rollout_correction"), "bypass_mode", False))
    if directory not in _LOSS_DUMPS:
        meta = {
            "source": "verl_loss", "method": method, "params": params, "verl_loss_mode": VERL_LOSS_NAMES.get(method),
            "columns": {
                "logp_before": "verl's old_log_prob, the loss's anchor: the train-side recomputation before the "
                               "update, or the rollout log-prob in bypass mode",
                "logp_after": "log_prob: the current policy's at this loss call",
                "logp_rollout": "the rollout log-prob (= old_log_prob) in bypass mode, else absent",
                "step": "this worker's loss-call count (verl does not pass the training step to the loss)",
            },
        }
        _LOSS_DUMPS[directory] = [DumpWriter(directory, every=every, metadata=meta), 0]
    entry = _LOSS_DUMPS[directory]
    entry[1] += 1
    writer = entry[0]
    if not writer.due(entry[1]):
        return
    writer.write(step=entry[1], response_mask=mask, logp_before=old_log_prob, logp_after=log_prob,
                 logp_rollout=old_log_prob if bypass else None, advantage=advantages)
    writer.close()


def dump_verl_batch(writer, batch: Any, step: int) -> None:
    """One verl DataProto (after advantages) as dump rows; groups are the distinct uids.
    Reads only what both trainers hold there: the v1 trainer's `_compute_advantage` fetches
    uid, response_mask, old/rollout log-probs and rewards but not the response token ids, so
    `token_ids` is dumped only where the batch has `responses` (the legacy trainer)."""
    import numpy as np

    b = batch.batch
    keys = set(b.keys())
    uid = batch.non_tensor_batch.get("uid")
    writer.write(
        step=step, response_mask=b["response_mask"].bool(), advantage=b["advantages"],
        token_ids=b["responses"] if "responses" in keys else None, logp_before=b["old_log_probs"],
        logp_rollout=b["rollout_log_probs"] if "rollout_log_probs" in keys else None,
        group_id=None if uid is None else np.unique(np.asarray(uid).astype(str), return_inverse=True)[1],
    )
    writer.close()


def _dumping(original: Callable, writer, calls: list) -> Callable:
    """`original` (returns the DataProto with advantages), dumping every due batch it returns."""

    def wrapped(data, *args, **kwargs):
        out = original(data, *args, **kwargs)
        calls[0] += 1
        step = int(out.meta_info.get("global_steps", calls[0]))
        if writer.due(step):
            dump_verl_batch(writer, out, step)
        return out

    wrapped.drpo_dump = True
    return wrapped


def install_driver_dump(directory: str, every: int = 1) -> None:
    """Wrap where verl's drivers compute advantages so the driver dumps each `every`-th batch
    after it; training is unchanged. Called on import when DRPO_VERL_DUMP_DIR is set.
      legacy trainer: `ray_trainer.compute_advantage`;
      v1 trainer (the default): `compute_advantage_for_multi_trajectories` as `trainer_base.
      _compute_advantage` calls it (it scatters GRPO advantages to every row after verl's
      `compute_advantage`, so the dump sees the advantages the actor trains on)."""
    from verl.trainer.ppo import ray_trainer

    from drpo.dumps import DumpWriter

    if getattr(ray_trainer.compute_advantage, "drpo_dump", False):
        return
    meta = {
        "source": "verl_driver",
        "columns": {
            "logp_rollout": "rollout_log_probs: the rollout engine's log-prob of the sampled token (when verl keeps them)",
            "logp_before": "old_log_probs: train-side recomputation before the update (the rollout log-prob in "
                           "bypass mode)",
            "token_ids": "responses, where the batch holds them (the v1 trainer's advantage step does not)",
            "step": "verl's global_steps where the batch carries it, else the count of advantage computations",
        },
    }
    writer = DumpWriter(directory, every=every, metadata=meta)
    calls = [0]
    ray_trainer.compute_advantage = _dumping(ray_trainer.compute_advantage, writer, calls)
    try:
        from verl.trainer.ppo.v1 import trainer_base
    except ImportError as err:  # verl without its "verl-core" extra (TransferQueue): no v1 trainer
        logger.warning("drpo: verl's v1 trainer is not importable (%r); only the legacy trainer is dumped", err)
        return
    trainer_base.compute_advantage_for_multi_trajectories = _dumping(
        trainer_base.compute_advantage_for_multi_trajectories, writer, calls)


# ---------------------------------------------------------------- the driver's composed config
def bypass_rollout_rs_problem(config: Any) -> str | None:
    """Why a composed verl config would silently skip rejection sampling in a drpo loss, or None.
    In bypass mode verl computes no rollout correction in the trainer; the drpo loss applies
    `rollout_rs` only from the actor's `policy_loss.rollout_correction`, which verl does not
    fill from `algorithm.rollout_correction`."""
    algo = _get(_get(config, "algorithm"), "rollout_correction")
    if algo is None or not _get(algo, "bypass_mode", False) or _get(algo, "rollout_rs") is None:
        return None
    policy = _get(_get(_get(config, "actor_rollout_ref"), "actor"), "policy_loss")
    if _get(policy, "loss_mode") not in VERL_LOSS_NAMES.values():
        return None
    actor = _get(policy, "rollout_correction")
    keys = ("bypass_mode", "rollout_rs", "rollout_rs_threshold")
    if actor is not None and all(_get(actor, k) == _get(algo, k) for k in keys):
        return None
    return (
        f"algorithm.rollout_correction.bypass_mode=true with rollout_rs={_get(algo, 'rollout_rs')!r}, but "
        f"actor_rollout_ref.actor.policy_loss.rollout_correction does not carry them, so the drpo loss "
        f"{_get(policy, 'loss_mode')!r} would skip that rejection sampling; add "
        "'+actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}' "
        "or set algorithm.rollout_correction.rollout_rs=null"
    )


def install_config_check() -> None:
    """Refuse, in verl's own `validate_config` (which `verl.trainer.main_ppo.main` calls on the
    driver with the composed config), a config `bypass_rollout_rs_problem` objects to. Installed
    on import: `import verl` loads this plugin before main_ppo binds `validate_config`."""
    from verl.utils import config as verl_config

    original = verl_config.validate_config
    if getattr(original, "drpo_check", False):
        return

    def validate_config(config, *args, **kwargs):
        problem = bypass_rollout_rs_problem(config)
        if problem:
            raise ValueError(problem)
        return original(config, *args, **kwargs)

    validate_config.__doc__ = original.__doc__
    validate_config.drpo_check = True
    verl_config.validate_config = validate_config


def make_verl_policy_loss(method: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """`compute_policy_loss` of drpo `method`: verl's policy-loss signature, by keyword or position."""
    get_method(method)
    loss_fn = functools.partial(compute_policy_loss, method)
    loss_fn.__name__ = loss_fn.__qualname__ = f"drpo_{method}_policy_loss"
    loss_fn.__doc__ = f"drpo method {method!r} as a verl policy loss (see drpo.integrations.verl)."
    loss_fn.drpo_method = method  # marks the entry as ours, so re-registration is idempotent
    return loss_fn


def _is_ours(fn: Any, method: str) -> bool:
    return getattr(fn, "drpo_method", None) == method


def register_all() -> dict[str, str]:
    """Register every drpo method (built-in and user-registered) into verl's registry,
    never replacing one of verl's own losses. Returns drpo name -> verl loss_mode."""
    for method in METHODS:
        name = method
        if name in POLICY_LOSS_REGISTRY and not _is_ours(POLICY_LOSS_REGISTRY[name], method):
            name = f"drpo_{method}"
        if name in POLICY_LOSS_REGISTRY and not _is_ours(POLICY_LOSS_REGISTRY[name], method):
            logger.warning("verl already has policy losses %r and %r; drpo method %r not registered", method, name, method)
            continue
        register_policy_loss(name)(make_verl_policy_loss(method))
        VERL_LOSS_NAMES[method] = name
    return dict(VERL_LOSS_NAMES)


register_all()
try:
    install_config_check()
except Exception as err:  # the losses are registered already; verl logs plugin errors only at DEBUG
    logger.warning("drpo: the bypass-mode config check was not installed: %r", err)
if os.environ.get("DRPO_VERL_DUMP_DIR"):
    try:  # the losses are registered already: a failed dump hook must not unregister them
        install_driver_dump(os.environ["DRPO_VERL_DUMP_DIR"], int(os.environ.get("DRPO_VERL_DUMP_EVERY", "1")))
    except Exception as err:  # verl logs plugin errors only at DEBUG: say it loudly
        logger.warning("drpo: DRPO_VERL_DUMP_DIR is set but the driver dump hook was not installed: %r", err)
