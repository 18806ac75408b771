"""Tasks: prompts with reference answers, a resumable training stream and a held-out eval split.

    task = make_task(cfg.task, seed)      # cfg.task: drpo.train.config.TaskConfig
    task.train_example(i)                 # i-th training Example(prompt, answer)
    task.eval_examples                    # held-out Examples
    task.reward(completion, answer)       # in [0, 1]
"""

from __future__ import annotations

from drpo.rewards import get_reward
from drpo.tasks.arithmetic import eval_problems, train_stream
from drpo.tasks.base import Example, Task, check_examples, held_out, training_stream
from drpo.tasks import wordproblems
from drpo.tasks.jsonl import DatasetError, cycle_stream, load_jsonl, split_examples

__all__ = ["DatasetError", "Example", "Task", "check_examples", "load_jsonl", "make_task"]


def make_task(cfg, seed: int) -> Task:
    """Build the task named by `cfg` (a TaskConfig). Eval data is held out of training."""
    if cfg.name == "wordproblems":
        problem = wordproblems.problems(seed, cfg.n_ops)
        held = held_out(problem, cfg.eval_size)
        return Task("wordproblems", training_stream(problem, held), held, wordproblems.word_problem_reward)
    reward = get_reward(cfg.reward_name)
    if cfg.name == "arithmetic":
        held = eval_problems(seed, cfg.eval_size, cfg.digits, cfg.ops)
        return Task("arithmetic", train_stream(seed, cfg.digits, cfg.ops, held), held, reward)
    if cfg.name == "jsonl":
        examples = load_jsonl(cfg.dataset)
        if cfg.eval_dataset:
            train, held = examples, load_jsonl(cfg.eval_dataset)[: cfg.eval_size]
        else:
            train, held = split_examples(examples, cfg.eval_size, seed)
        return Task("jsonl", cycle_stream(train, seed), tuple(held), reward, train_set=tuple(train))
    raise ValueError(f"unknown task.name {cfg.name!r}; choose arithmetic, jsonl or wordproblems")
