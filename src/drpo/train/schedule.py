"""The learning-rate schedule shared by the SFT warm start and RL: linear warmup, then
cosine decay to 0 at the last optimizer step, or constant."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "constant"]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: Schedule) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "constant":
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
