"""RL with TRL's GRPOTrainer and a drpo objective, on drpo's built-in arithmetic task.

    # CPU, the tiny warm-started default policy (as `drpo train` builds it), 20 steps:
    .venv/bin/python examples/trl/train_drpo_trl.py --steps 20 --out runs/trl-drpo

    # any drpo method and parameters; a local Hugging Face model directory or SmolLM2:
    .venv/bin/python examples/trl/train_drpo_trl.py --method dppo_tv --params '{"delta_high": 0.2}'
    .venv/bin/python examples/trl/train_drpo_trl.py --model smollm2 --max-new-tokens 16

    # rollout dumps every step, then what each trust region would do to them:
    .venv/bin/python examples/trl/train_drpo_trl.py --steps 4 --dump-every 1 --out runs/trl-drpo
    .venv/bin/drpo inspect runs/trl-drpo/dumps --out runs/trl-drpo/inspect

    # N processes on CPU (gloo): torchrun starts them (`accelerate launch --cpu` starts one only)
    .venv/bin/torchrun --nproc_per_node 2 examples/trl/train_drpo_trl.py --steps 3

    # N GPUs, one process each, with vLLM generating (then the rollout log-probs are the anchor):
    accelerate launch --multi_gpu --num_processes 8 examples/trl/train_drpo_trl.py \
        --model /path/to/Qwen3-4B-Base --use-vllm ...

Metrics (drpo diagnostics as drpo/*, TRL's reward, entropy, ...) go to TensorBoard under
--out (`tensorboard --logdir runs/trl-drpo`) and to `log_history.json` there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import Dataset

from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer
from drpo.tasks import make_task
from drpo.train.config import Config
from drpo.train.setup import load_model, pick_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (warm-started), smollm2, or a local HF model directory")
    p.add_argument("--method", default="drpo", help="drpo method (drpo.objectives.METHODS)")
    p.add_argument("--params", default="{}", help='method parameters as JSON, e.g. \'{"delta": 12.5}\'')
    p.add_argument("--anchor", default="auto", choices=("auto", "rollout", "old"))
    p.add_argument("--loss-type", default="dapo", choices=("dapo", "bnpo", "dr_grpo", "grpo"),
                   help="TRL's loss normalisation (TRL's default: dapo)")
    p.add_argument("--scale-rewards", default="none", choices=("none", "group", "batch"),
                   help="TRL's advantage scaling; the paper's recipe only mean-centres (none); TRL's default is group")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8, help="group size G")
    p.add_argument("--updates-per-rollout", type=int, default=1, help="TRL num_iterations")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--digits", type=int, default=2, help="arithmetic operand digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-vllm", action="store_true", help="generate with vLLM (GPU)")
    p.add_argument("--dump-every", type=int, default=0,
                   help="write rollout dumps for `drpo inspect` to OUT/dumps every N steps (0: off)")
    p.add_argument("--out", default="runs/trl-drpo")
    return p.parse_args(argv)


def build_policy(args):
    """The policy exactly as `drpo train` would build it for the same model/task/seed."""
    cfg = Config.model_validate(
        {"seed": args.seed, "model": {"name": args.model}, "task": {"name": "arithmetic", "digits": args.digits}}
    )
    task = make_task(cfg.task, cfg.seed)
    model, tokenizer, _ = load_model(cfg, task, pick_device("cpu"))
    return model, tokenizer, task


def build_dataset(task, n: int) -> Dataset:
    # The task's training stream, in order (prompt + reference answer).
    rows = [task.train_example(i) for i in range(n)]
    return Dataset.from_list([{"prompt": ex.prompt, "answer": ex.answer} for ex in rows])


def make_reward(task):
    def task_reward(prompts, completions, answer, **kwargs) -> list[float]:
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    return task_reward


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer, task = build_policy(args)
    config = DRPOConfig(
        output_dir=args.out,
        drpo_method=args.method,
        drpo_params=args.params,
        drpo_anchor=args.anchor,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        num_iterations=args.updates_per_rollout,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=["tensorboard"],
        save_strategy="no",
        seed=args.seed,
        use_vllm=args.use_vllm,
        use_cpu=not args.use_vllm,
        bf16=False,
        shuffle_dataset=False,
        drpo_dump_dir=str(Path(args.out) / "dumps") if args.dump_every else None,
        drpo_dump_every=max(args.dump_every, 1),
    )
    trainer = DRPOGRPOTrainer(
        model=model,
        reward_funcs=make_reward(task),
        args=config,
        train_dataset=build_dataset(task, args.steps * args.prompts_per_step),
        processing_class=tokenizer,
    )
    trainer.train()
    if not trainer.accelerator.is_main_process:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    last = [e for e in trainer.state.log_history if "reward" in e][-1]
    print(
        f"done: {args.steps} steps on {trainer.accelerator.num_processes} process(es), last reward {last['reward']:.3f}, "
        f"drpo/kept_grad_mass {last.get('drpo/kept_grad_mass', float('nan')):.3f}; logs in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
