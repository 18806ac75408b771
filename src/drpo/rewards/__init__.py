"""Rule-based verifiers: a completion and a reference answer in, a reward in {0, 1} out.

    exact_reward     the completion (up to the first newline) is exactly the answer
    math_reward      the final boxed answer, else the last number, compared with the
                     reference by `math-verify` when installed, else numerically
"""

from drpo.rewards.verifiers import (
    REWARDS, exact_reward, extract_boxed, extract_last_number, final_answer, get_reward, has_math_verify,
    math_reward,
)

__all__ = ["REWARDS", "exact_reward", "extract_boxed", "extract_last_number", "final_answer", "get_reward",
           "has_math_verify", "math_reward"]
