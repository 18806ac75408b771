"""What every task hands the trainer: prompts with reference answers, split into a training
stream and a held-out eval set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Example:
    """One prompt (plain text, before any chat template) and its reference answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """`train_example(i)` is the i-th training example: a pure function of the index, so the
    data position of a resumed run is just an integer. `eval_examples` is held out from it.
    `reward` maps (completion text, reference answer) to a reward in [0, 1]."""

    name: str
    train_example: Callable[[int], Example]
    eval_examples: tuple[Example, ...]
    reward: Callable[[str, str], float]
    stop_at_newline: bool = False
