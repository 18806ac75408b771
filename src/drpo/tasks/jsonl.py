"""JSONL math datasets: one `{"prompt"|"question": ..., "answer": ...}` object per line.

Malformed lines stop the load with the file and line number; nothing is skipped silently.
Each example keeps its FILE:LINE, so the trainer's load-time tokenizer and length checks
(drpo.tasks.base.check_examples) name it too.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from drpo.tasks.base import DatasetError, Example
from drpo.textfile import NotUTF8Error, decode_utf8

__all__ = ["DatasetError", "cycle_stream", "load_jsonl", "split_examples"]


def _parse_line(path: Path, lineno: int, line: str) -> Example:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as err:
        text = line.rstrip("\r\n")
        raise DatasetError(f"{where}: invalid JSON ({err.msg} at column {err.colno}): "
                           f"{text[:80]!r}{'...' if len(text) > 80 else ''}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    keys = [k for k in ("prompt", "question") if k in obj]
    if len(keys) != 1:
        raise DatasetError(f"{where}: needs exactly one of the keys 'prompt' or 'question', found keys {sorted(obj)}")
    prompt = obj[keys[0]]
    if "answer" not in obj:
        raise DatasetError(f"{where}: missing key 'answer' (keys: {sorted(obj)})")
    answer = obj["answer"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: '{keys[0]}' must be a non-empty string, got {prompt!r}")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise DatasetError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
    return Example(prompt=prompt, answer=str(answer).strip(), source=where)


def load_jsonl(path: str | Path) -> list[Example]:
    """All examples of a JSONL file. Blank lines are allowed (and ignored); anything else
    that is not a valid example raises DatasetError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    examples = []
    with path.open("rb") as f:  # bytes, decoded a line at a time: a bad byte is named by its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = decode_utf8(raw, path, lineno)
            except NotUTF8Error as err:
                raise DatasetError(str(err)) from None
            if line.strip():
                examples.append(_parse_line(path, lineno, line))
    if not examples:
        raise DatasetError(f"{path}: no examples (file is empty)")
    return examples


def split_examples(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the first `eval_size` are held out for eval."""
    if not 0 < eval_size < len(examples):
        raise DatasetError(
            f"task.eval_size={eval_size} must be in [1, {len(examples) - 1}] for a dataset of {len(examples)} examples"
        )
    order = list(range(len(examples)))
    random.Random(f"jsonl/{seed}").shuffle(order)
    held = [examples[i] for i in order[:eval_size]]
    train = [examples[i] for i in order[eval_size:]]
    return train, held


def cycle_stream(examples: list[Example], seed: int):
    """train_example(i): epoch-wise reshuffled pass over `examples`, a pure function of i."""
    n = len(examples)

    @functools.lru_cache(maxsize=2)
    def epoch_order(epoch: int) -> list[int]:
        order = list(range(n))
        random.Random(f"jsonl/{seed}/epoch/{epoch}").shuffle(order)
        return order

    def train_example(i: int) -> Example:
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"training example index must be a non-negative int, got {i!r}")
        epoch, pos = divmod(i, n)
        return examples[epoch_order(epoch)[pos]]

    return train_example
