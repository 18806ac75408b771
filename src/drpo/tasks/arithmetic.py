"""The built-in arithmetic task family: `a+b=` style problems with exact answer checking.

Difficulty knobs: operand digits and the operators. Every problem is a pure function of
(seed, split, index), so the stream is reproducible and resumable; the eval problems are
excluded from the training stream so the eval split is genuinely held out.
"""

from __future__ import annotations

import random

from drpo.tasks.base import Example, held_out, training_stream

OPS = ("+", "-", "*")


def check_arith_params(digits: int, ops: str) -> None:
    if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 6:
        raise ValueError(f"task.digits must be an int in [1, 6], got {digits!r}")
    if not isinstance(ops, str) or not ops or any(op not in OPS for op in ops):
        raise ValueError(f"task.ops must be a non-empty string of operators from {''.join(OPS)!r}, got {ops!r}")


def make_problem(rng: random.Random, digits: int, ops: str) -> Example:
    """One problem drawn from `rng`; subtraction keeps a >= b so answers stay non-negative."""
    hi = 10**digits - 1
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    op = ops[rng.randrange(len(ops))]
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Example(prompt=f"{a}{op}{b}=", answer=str(value))


def problem_at(seed: int, split: str, index: int, digits: int, ops: str) -> Example:
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes.
    return make_problem(random.Random(f"arith/{seed}/{split}/{index}"), digits, ops)


def eval_problems(seed: int, size: int, digits: int, ops: str) -> tuple[Example, ...]:
    """`size` distinct held-out problems."""
    check_arith_params(digits, ops)
    n_distinct = (10**digits) ** 2 * len(ops)
    if size > n_distinct // 4:
        raise ValueError(
            f"task.eval_size={size} is too large for digits={digits}, ops={ops!r} "
            f"(at most {n_distinct // 4} of the ~{n_distinct} problems may be held out)"
        )
    return held_out(lambda split, index: problem_at(seed, split, index, digits, ops), size)


def train_stream(seed: int, digits: int, ops: str, held: tuple[Example, ...]):
    """Returns train_example(i): the i-th training problem, never one of `held`."""
    check_arith_params(digits, ops)
    return training_stream(lambda split, index: problem_at(seed, split, index, digits, ops), held)
