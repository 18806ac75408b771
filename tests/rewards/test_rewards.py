"""Verifiers on hand-made completions."""

import pytest

from drpo.rewards import (
    exact_reward,
    extract_boxed,
    extract_last_number,
    final_answer,
    get_reward,
    has_math_verify,
    math_reward,
)
from drpo.rewards import verifiers


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("42", "42", 1.0),
        (" 42 ", "42", 1.0),
        ("42\nsome trailing text", "42", 1.0),
        ("4", "42", 0.0),
        ("421", "42", 0.0),
        ("42.0", "42", 0.0),  # exact means exact: the tiny task must emit the integer
        ("", "42", 0.0),
        ("the answer is 42", "42", 0.0),
    ],
)
def test_exact_reward(completion, answer, expected):
    assert exact_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{7}", "7"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {x^{2}+1} done", "x^{2}+1"),
        ("no box 5", None),
        ("unbalanced \\boxed{3", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("17+25 = 42.", "42"),
        ("a total of 1,234 apples", "1234"),
        ("-3 then 2.5", "2.5"),
        ("temperature -7", "-7"),
        ("ratio 3/4", "3/4"),
        ("no digits here", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_final_answer_prefers_boxed_over_last_number():
    assert final_answer("\\boxed{12} and later 99") == "12"
    assert final_answer("first 3 then 4") == "4"


@pytest.mark.parametrize("use_math_verify", [True, False])
@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("The sum is \\boxed{42}", "42", 1.0),
        ("17 + 25 = 42", "42", 1.0),
        ("17 + 25 = 32", "42", 0.0),
        ("\\boxed{0.5}", "1/2", 1.0),
        ("it is 1,000", "1000", 1.0),
        ("3.0", "3", 1.0),
        ("I don't know", "3", 0.0),
        ("\\boxed{41} (not 42)", "42", 0.0),
    ],
)
def test_math_reward(monkeypatch, use_math_verify, completion, answer, expected):
    if use_math_verify and not has_math_verify():
        pytest.skip("math-verify not installed")
    monkeypatch.setattr(verifiers, "has_math_verify", lambda: use_math_verify)
    assert math_reward(completion, answer) == expected


def test_math_verify_handles_latex_fraction():
    if not has_math_verify():
        pytest.skip("math-verify not installed")
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{\\frac{1}{3}}", "0.5") == 0.0


def test_get_reward_unknown_name():
    with pytest.raises(ValueError, match="unknown reward 'fuzzy'"):
        get_reward("fuzzy")
