"""Verifiers. Each is `reward(completion: str, answer: str) -> float` in {0.0, 1.0}."""

from __future__ import annotations

import importlib.util
import re
from fractions import Fraction
from typing import Callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def exact_reward(completion: str, answer: str) -> float:
    """1 if the completion's first line, stripped, is exactly the answer. The built-in
    arithmetic task uses this: the policy must emit the answer and stop."""
    return float(completion.split("\n", 1)[0].strip() == answer.strip())


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1 : j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in `text` (integers, decimals, simple fractions, thousands commas
    removed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "")


def final_answer(completion: str) -> str | None:
    """The final boxed answer if there is one, else the last number."""
    boxed = extract_boxed(completion)
    return boxed if boxed is not None else extract_last_number(completion)


def has_math_verify() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def _as_fraction(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def _numeric_equal(pred: str, ref: str) -> bool:
    a, b = _as_fraction(pred), _as_fraction(ref)
    if a is not None and b is not None:
        return a == b
    return pred.strip() == ref.strip()


def _math_verify_equal(pred: str, ref: str) -> bool:
    from math_verify import parse, verify

    # Wrapping in $...$ makes math-verify parse the text as LaTeX as well as plain numbers.
    gold = parse(f"${ref}$")
    guess = parse(f"${pred}$")
    if not gold or not guess:
        return _numeric_equal(pred, ref)
    return bool(verify(gold, guess))


def math_reward(completion: str, answer: str) -> float:
    """1 if the completion's final answer (boxed, else last number) equals the reference."""
    pred = final_answer(completion)
    if pred is None:
        return 0.0
    if has_math_verify():
        return float(_math_verify_equal(pred, answer))
    return float(_numeric_equal(pred, answer))


REWARDS: dict[str, Callable[[str, str], float]] = {"exact": exact_reward, "math": math_reward}


def get_reward(name: str) -> Callable[[str, str], float]:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}") from None
