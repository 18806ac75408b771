"""A few TRL `GRPOTrainer` steps against `DRPOGRPOTrainer(drpo_method="grpo")` with TRL's clip
range, in one process, on the same weights, prompts and seed: the logged loss and grad norm
of every step must be equal (the rollouts are the same samples; num_iterations=2, so every
second step is off-policy), and each trainer's steps/s is measured after its first step.

    python scripts/gpu/trl_steps.py --model DIR --json R.json [--steps 4] [--device cuda]

DIR is a local Hugging Face policy (scripts/gpu/qwen2_policy.py). Equal means within
rel 1e-4 (abs 1e-6 for the loss, which is ~0 on-policy: group advantages sum to zero).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer

PROMPTS = [f"{a}+{b}=" for a, b in [(12, 34), (5, 7), (40, 2), (9, 99), (31, 8), (77, 6), (23, 45), (60, 18)]]
GRPO = dict(drpo_method="grpo", drpo_params={"eps_low": 0.2, "eps_high": 0.2})  # TRL's default epsilon 0.2
REL, ABS = 1e-4, 1e-6


def spread_reward(prompts, completions, **kwargs) -> list[float]:
    """Varies between any two random completions, so groups of random text get advantages."""
    return [(sum(map(ord, text)) % 17) / 17 for text in completions]


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def run(kind: str, args, out_dir: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    common = dict(output_dir=out_dir, per_device_train_batch_size=args.batch, num_generations=args.generations,
                  max_completion_length=args.completion_len, max_steps=args.steps, num_iterations=2,
                  learning_rate=1e-5, temperature=1.0, logging_steps=1, report_to=[], save_strategy="no",
                  use_cpu=args.device == "cpu", bf16=False, seed=0)
    config, cls = (GRPOConfig(**common), GRPOTrainer) if kind == "trl" else (DRPOConfig(**common, **GRPO), DRPOGRPOTrainer)
    clock = StepClock()
    trainer = cls(model=model, reward_funcs=spread_reward, args=config, processing_class=tokenizer,
                  train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]), callbacks=[clock])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e and "grad_norm" in e]
    ends = clock.ends
    result = {
        "trainer": cls.__name__, "steps": len(ends),
        "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "loss": [e["loss"] for e in logged], "grad_norm": [e["grad_norm"] for e in logged],
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "device": str(next(model.parameters()).device),
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def close(a: float, b: float, abs_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=abs_tol)


def compare(trl: dict, drpo: dict) -> dict:
    n = len(trl["loss"])
    equal = n > 0 and n == len(drpo["loss"]) and all(
        close(a, b, ABS) for a, b in zip(trl["loss"], drpo["loss"])
    ) and all(close(a, b, 0.0) for a, b in zip(trl["grad_norm"], drpo["grad_norm"]))
    diffs = [abs(a - b) for a, b in zip(trl["loss"], drpo["loss"])]
    return {"equal": equal, "max_abs_loss_diff": max(diffs, default=None),
            "steps_per_s_drpo_vs_trl": drpo["steps_per_s"] / trl["steps_per_s"]
            if drpo["steps_per_s"] and trl["steps_per_s"] else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="per-device batch (completions)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {kind: run(kind, args, f"{tmp}/{kind}") for kind in ("trl", "drpo")}
    result = {"settings": vars(args) | {"json": str(args.json)}, **runs, **compare(runs["trl"], runs["drpo"])}
    args.json.write_text(json.dumps(result, indent=1))
    for kind, r in runs.items():
        print(f"{r['trainer']:<16} {r['steps']} steps, {r['steps_per_s'] or float('nan'):.3f} steps/s, "
              f"loss {r['loss']}, grad_norm {r['grad_norm']}")
    print(f"trl: equal={result['equal']} max_abs_loss_diff={result['max_abs_loss_diff']} "
          f"steps_per_s_drpo_vs_trl={result['steps_per_s_drpo_vs_trl']}")
    return 0 if result["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
