"""Trust-region policy objectives: DRPO and its baselines, registered by name, each with its
autograd objective, its closed-form gradient weight, its boundary and diagnostics.

    from drpo.objectives import policy_loss, gradient_weight, METHODS
    loss, metrics = policy_loss("drpo", logp, old_logp, advantages, mask, delta=12.5)
"""

from drpo.objectives import methods as _methods  # noqa: F401  (registers the built-ins)
from drpo.objectives.diagnostics import METRIC_NAMES, diagnostic_tensors
from drpo.objectives.loss import (
    AGG_MODES, NONFINITE_MODES, aggregate, gradient_weight, logp_gradient, per_token_objective, policy_loss,
)
from drpo.objectives.methods import LOG_RATIO_CLAMP, binary_kl, log_ratio, loose_threshold_note, ratio, tv_shift
from drpo.objectives.registry import METHODS, Method, get_method, list_methods, register_method

__all__ = [
    "AGG_MODES", "LOG_RATIO_CLAMP", "METHODS", "METRIC_NAMES", "NONFINITE_MODES", "Method", "aggregate",
    "binary_kl", "diagnostic_tensors", "get_method", "gradient_weight", "list_methods", "log_ratio",
    "loose_threshold_note", "logp_gradient", "per_token_objective", "policy_loss", "ratio", "register_method",
    "tv_shift",
]
