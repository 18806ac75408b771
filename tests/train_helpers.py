"""Small shared settings for the trainer tests: a very small tiny model so runs take seconds."""

from __future__ import annotations

from drpo.train.config import load_config

FAST = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "warmstart.steps=10",
    "warmstart.batch_size=16",
    "warmstart.warmup_steps=2",
    "warmstart.check_size=16",
    "warmstart.on_miss=continue",  # 10 SFT steps never reach the target; the tests need a policy, not a good one
    "task.eval_size=16",
    "rollout.prompts_per_step=4",
    "rollout.n_samples=4",
    "rollout.max_new_tokens=5",
    "train.threads=1",
]


def fast_config(tmp_path, *overrides):
    return load_config(None, [*FAST, f"warmstart.cache_dir={tmp_path / 'cache'}", *overrides])


def fast_args(tmp_path, *overrides):
    args = []
    for item in [*FAST, f"warmstart.cache_dir={tmp_path / 'cache'}", *overrides]:
        args += ["--set", item]
    return args
