"""What every task hands the trainer: prompts with reference answers, split into a training
stream and a held-out eval set, and the load-time check that the model can read them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable


class DatasetError(ValueError):
    """A dataset file is missing, has a malformed line, or holds an example the model cannot
    take (untokenizable text, a prompt longer than the model's positions)."""


@dataclass(frozen=True)
class Example:
    """One prompt (plain text, before any chat template) and its reference answer. `source`
    says where it came from (FILE:LINE for datasets) for error messages."""

    prompt: str
    answer: str
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Task:
    """`train_example(i)` is the i-th training example: a pure function of the index, so the
    data position of a resumed run is just an integer. `eval_examples` is held out from it.
    `reward` maps (completion text, reference answer) to a reward in [0, 1]. `train_set`:
    every training example when the set is finite (a dataset file), else None."""

    name: str
    train_example: Callable[[int], Example]
    eval_examples: tuple[Example, ...]
    reward: Callable[[str, str], float]
    train_set: tuple[Example, ...] | None = None


# A generated task's problem(split, index): a pure function of both (and of the task's seed).
Problem = Callable[[str, int], Example]


def held_out(problem: Problem, size: int) -> tuple[Example, ...]:
    """`size` eval problems with distinct prompts (problem("eval", 0), ("eval", 1), ...)."""
    seen: dict[str, Example] = {}
    for index in itertools.count():
        if len(seen) == size:
            return tuple(seen.values())
        ex = problem("eval", index)
        seen.setdefault(ex.prompt, ex)


def training_stream(problem: Problem, held: tuple[Example, ...]) -> Callable[[int], Example]:
    """train_example(i): problem("train/0", i), never one of `held`'s prompts."""
    excluded = {ex.prompt for ex in held}

    def train_example(i: int) -> Example:
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"training example index must be a non-negative int, got {i!r}")
        for attempt in itertools.count():  # redraw a held-out problem (deterministically), never train on it
            ex = problem(f"train/{attempt}", i)
            if ex.prompt not in excluded:
                return ex

    return train_example


GENERATED_CHECKED = 512  # training examples checked from a generated (infinite) stream


def _encode(encode: Callable[[str], list[int]], text: str, what: str, ex: Example, where: str, unk_id) -> list[int]:
    try:
        ids = encode(text)
    except Exception as err:  # tokenizers raise bare Exceptions for characters outside the vocabulary
        bad = next((c for c in text if not _encodes(encode, c)), None)
        detail = f"character {bad!r} (U+{ord(bad):04X}) is not in its vocabulary" if bad else str(err)
        raise DatasetError(f"{where}: {what} {text!r} cannot be tokenized by the model's tokenizer: {detail}") from None
    if unk_id is not None and unk_id in ids:
        raise DatasetError(f"{where}: {what} {text!r} contains text the model's tokenizer maps to its unknown token")
    return ids


def _encodes(encode, text: str) -> bool:
    try:
        encode(text)
        return True
    except Exception:
        return False


def check_examples(task: Task, *, encode_prompt: Callable[[str], list[int]], encode_answer: Callable[[str], list[int]],
                   unk_id: int | None, max_positions: int | None, max_new_tokens: int,
                   positions_key: str = "the model's max_position_embeddings") -> None:
    """Every example the run will use (all of a dataset; eval plus the first
    GENERATED_CHECKED of a generated stream) must tokenize, and its prompt plus
    `max_new_tokens` must fit the model's positions. Raises DatasetError naming FILE:LINE
    (or the example) and the offending value."""
    train = task.train_set if task.train_set is not None else [task.train_example(i) for i in range(GENERATED_CHECKED)]
    for split, examples in (("train", train), ("eval", task.eval_examples)):
        for i, ex in enumerate(examples):
            where = ex.source or f"{task.name} {split} example {i}"
            ids = _encode(encode_prompt, ex.prompt, "prompt", ex, where, unk_id)
            _encode(encode_answer, ex.answer, "answer", ex, where, unk_id)
            if max_positions is not None and len(ids) + max_new_tokens > max_positions:
                raise DatasetError(
                    f"{where}: prompt {ex.prompt[:60]!r}{'...' if len(ex.prompt) > 60 else ''} is {len(ids)} tokens; "
                    f"with rollout.max_new_tokens={max_new_tokens} that is {len(ids) + max_new_tokens} > "
                    f"{max_positions} positions ({positions_key})"
                )
