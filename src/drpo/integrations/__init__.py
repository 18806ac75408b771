"""Adapters that plug drpo's objectives into other trainers.

    drpo.integrations.verl   every drpo method in verl's policy-loss registry (verl>=0.9.1)
    drpo.integrations.trl    DRPOGRPOTrainer / DRPOConfig on top of TRL's GRPOTrainer

Each module imports its framework at import time, so import the one you use; neither is
imported here (verl and TRL pin different transformers versions and rarely share a venv).
"""

from collections.abc import Mapping
from typing import Any


def split_drpo_params(drpo_params: Mapping[str, Any], strict_name: str) -> tuple[dict[str, Any], str]:
    """An adapter's `drpo_params`: the method's parameters, and the `policy_loss(nonfinite=)`
    mode its key `strict` selects. false (the default): "drop", as verl's and TRL's own losses
    carry on past a bad log-prob; true: "raise". `strict_name` names the key in errors."""
    strict = drpo_params.get("strict", False)
    if not isinstance(strict, bool):
        raise ValueError(f"{strict_name} must be true or false, got {strict!r}")
    return {k: v for k, v in drpo_params.items() if k != "strict"}, "raise" if strict else "drop"
