"""End-to-end RL throughput of `drpo train` versus TRL's GRPOTrainer, on CPU, in one run.

Both run the same work: the same warm-started tiny policy (drpo's cached warm start, loaded
identically for each side), the same prompts in the same order (the arithmetic task's
training stream), group size G, prompts per step, max new tokens, temperature, AdamW with the
same learning rate, one optimizer update per rollout, no evaluation, no checkpoints. An RL
step is sample -> reward -> advantages -> one optimizer step (-> weight sync for drpo).

drpo's step is the training loop's own step function (`drpo.train.step.rl_step`, the body of
`drpo train`'s loop); TRL's is one GRPOTrainer optimizer step (generation, reward, loss,
backward, AdamW), timed between its on_step_begin and on_step_end callbacks, so TRL's logging
is not counted against it. The two alternate step by step (a drpo step runs right after each
TRL step), so both see the same background load on a shared machine. The first `--warmup`
steps of each are not counted. Wall-clock ratios are the result; the CPU-time ratio is
printed too.

    .venv/bin/python benchmarks/trainer.py                 # defaults: 16 prompts x G=8, 6 tokens
    .venv/bin/python benchmarks/trainer.py --steps 12 --prompts 8 --group 8 --max-new-tokens 8

Last line: `trainer: steps_per_s_vs_trl=<x> tokens_per_s_vs_trl=<y>` (drpo / TRL).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from tqdm.auto import tqdm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10, help="timed RL steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed RL steps first")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method", default="drpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-warmstart", action="store_true", help="start both from the random init (smoke tests)")
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "group", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def make_config(args):
    from drpo.train.config import Config

    return Config.model_validate(
        {
            "seed": args.seed,
            "model": {"name": "tiny"},
            "warmstart": {"enabled": not args.no_warmstart},
            "task": {"name": "arithmetic"},
            "rollout": {
                "n_samples": args.group,
                "prompts_per_step": args.prompts,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "precision": "fp32",
                "sync_every": 1,
            },
            "objective": {"method": args.method},
            "optim": {"lr": args.lr, "updates_per_rollout": 1, "grad_accum": 1},
            "train": {"steps": args.warmup + args.steps, "eval_every": 10**9},
        }
    )


def make_drpo_stepper(cfg):
    """drpo's training loop, set up as `drpo train` sets it up; returns step(i) -> (wall
    seconds, CPU seconds, generated tokens) for RL step i (1-based)."""
    from drpo.tasks import make_task
    from drpo.train.setup import pick_device, seed_everything, setup
    from drpo.train.step import RunState, rl_step

    state = RunState(generator=seed_everything(cfg.seed, pick_device("cpu")))
    task = make_task(cfg.task, cfg.seed)
    run = setup(cfg, task, pick_device("cpu"), log=lambda *a: None)

    def step(i: int) -> tuple[float, float, int, dict]:
        t0, c0 = time.perf_counter(), time.process_time()
        row = rl_step(run, state, i)
        stages = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("time/")}
        return time.perf_counter() - t0, time.process_time() - c0, int(row["tokens/generated"]), stages

    return step


def run_interleaved(cfg, total_steps: int, drpo_step) -> tuple[list[tuple], list[tuple]]:
    """TRL's GRPOTrainer on the same work, with one drpo step run right after each TRL step,
    so both trainers see the same background load on a shared machine. Returns per-step
    (wall, cpu, tokens) for drpo and for TRL."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from drpo.tasks import make_task
    from drpo.train.setup import load_model, pick_device, seed_everything

    seed_everything(cfg.seed, pick_device("cpu"))
    task = make_task(cfg.task, cfg.seed)
    model, tokenizer, _ = load_model(cfg, task, pick_device("cpu"), log=lambda *a: None)
    r = cfg.rollout
    rows = [task.train_example(i) for i in range(total_steps * r.prompts_per_step)]
    data = Dataset.from_list([{"prompt": ex.prompt, "answer": ex.answer} for ex in rows])
    generated: list[int] = []

    def reward(prompts, completions, answer, completion_ids, **kwargs):
        generated.append(sum(len(ids) for ids in completion_ids))  # incl. EOS, as drpo counts
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    drpo_rows, trl_rows = [], []
    bar = tqdm(total=total_steps, desc="trl + drpo steps", leave=False)

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            trl_rows.append((time.perf_counter() - self.t0, time.process_time() - self.c0, generated[-1], {}))
            drpo_rows.append(drpo_step(state.global_step))
            bar.update()

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            max_steps=total_steps,
            per_device_train_batch_size=r.prompts_per_step * r.n_samples,
            num_generations=r.n_samples,
            max_completion_length=r.max_new_tokens,
            temperature=r.temperature,
            num_iterations=1,
            gradient_accumulation_steps=1,
            learning_rate=cfg.optim.lr,
            lr_scheduler_type="constant",
            adam_beta1=cfg.optim.beta1,
            adam_beta2=cfg.optim.beta2,
            weight_decay=cfg.optim.weight_decay,
            max_grad_norm=cfg.optim.grad_clip,
            beta=0.0,
            scale_rewards="none",  # mean-centred advantages, as drpo's default estimator
            loss_type="bnpo",  # token-mean, as drpo's default aggregation
            logging_steps=10**9,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            use_cpu=True,
            bf16=False,
            shuffle_dataset=False,
            seed=cfg.seed,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Interleave()],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    bar.close()
    return drpo_rows, trl_rows


def summarize(name: str, rows: list[tuple]) -> tuple[float, float, float]:
    wall = [row[0] for row in rows]
    cpu = sum(row[1] for row in rows)
    tokens = sum(row[2] for row in rows)
    steps_per_s, tokens_per_s = len(rows) / sum(wall), tokens / sum(wall)
    print(
        f"{name:>5}: {len(rows)} steps, {steps_per_s:.3f} steps/s, {tokens_per_s:.1f} generated tokens/s, "
        f"median step {statistics.median(wall) * 1e3:.0f} ms, CPU {cpu / len(rows) * 1e3:.0f} ms/step, "
        f"{tokens / len(rows):.0f} tokens/step"
    )
    stages = [row[3] for row in rows if row[3]]
    if stages:
        split = {k: sum(s[k] for s in stages) / sum(wall) for k in stages[0]}
        print("       wall-time split: " + ", ".join(f"{k} {v:.0%}" for k, v in split.items()))
    return steps_per_s, tokens_per_s, len(rows) / cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    total = args.warmup + args.steps
    print(
        f"tiny policy, arithmetic task, {args.prompts} prompts x G={args.group}, {args.max_new_tokens} new tokens, "
        f"1 update/rollout, method {args.method}, torch threads {torch.get_num_threads()}"
    )
    drpo_rows, trl_rows = run_interleaved(cfg, total, make_drpo_stepper(cfg))
    drpo_sps, drpo_tps, drpo_cpu = summarize("drpo", drpo_rows[args.warmup :])
    trl_sps, trl_tps, trl_cpu = summarize("trl", trl_rows[args.warmup :])
    print(f"CPU-time steps ratio (less sensitive to other load on the machine): {drpo_cpu / trl_cpu:.2f}")
    print(f"trainer: steps_per_s_vs_trl={drpo_sps / trl_sps:.2f} tokens_per_s_vs_trl={drpo_tps / trl_tps:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
