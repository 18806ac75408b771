"""The rollout precisions, named once: the config's type, the engine's check, the CLIs and
the study derive from here. Import-light (no torch), so `drpo train` validates a config
before loading anything heavy. What each precision does: `drpo.models.precision`."""

from typing import Literal, get_args

Precision = Literal["fp32", "bf16", "fp8_e4m3", "fp8_e5m2", "fp8_e2e"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
