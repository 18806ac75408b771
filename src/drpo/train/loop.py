"""The run: `train(cfg, out_dir, resume=False)` sets the run up once (`setup`), restores its
latest checkpoint when resuming, then runs the steps (`rl_step`), evaluating and
checkpointing on schedule, and returns the summary dict (also written as summary.json)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drpo.files import DiskFullError, LockHeldError, atomic_write, dir_lock, jsonable
from drpo.objectives import loose_threshold_note
from drpo.rollout import sync_weights
from drpo.tasks import Task, make_task
from drpo.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from drpo.train.config import Config
from drpo.train.metrics import MetricsLogger, combine, plot_curves, read_metrics, truncate_metrics
from drpo.train.setup import Policy, Run, RunError, Sampler, pick_device, prepare_out_dir, saved_config, seed_everything, setup
from drpo.train.step import RunState, rl_step

EVAL_BATCH = 128  # prompts per greedy eval batch


@torch.no_grad()
def evaluate(eval_engine, model, sampler: Sampler, step: int) -> dict[str, float]:
    """Greedy accuracy on the held-out split, sampled from a freshly synced copy of the policy
    at the rollout precision (what a deployment would serve)."""
    sync_weights(eval_engine, model, step)
    examples = list(sampler.task.eval_examples)
    correct, lengths = 0.0, 0.0
    for s in range(0, len(examples), EVAL_BATCH):
        batch = examples[s : s + EVAL_BATCH]
        rollout = sampler.sample(eval_engine, batch, None, sampler.greedy)
        correct += float(sampler.score(rollout, batch).sum())
        lengths += float(rollout.response_mask.sum())
    return {"eval/accuracy": correct / len(examples), "eval/response_length": lengths / len(examples)}


def checkpoint_state(policy: Policy, state: RunState) -> dict:
    return {
        "model": policy.model.state_dict(),
        "synced_from": state.synced_from,
        "optimizer": policy.optimizer.state_dict(),
        "scheduler": policy.scheduler.state_dict(),
        "step": state.step,
        "data_pos": state.data_pos,
        "last_sync": state.last_sync,
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def restore(ckpt: dict, policy: Policy, engine, state: RunState) -> None:
    model = policy.model
    model.load_state_dict(ckpt["model"])
    policy.optimizer.load_state_dict(ckpt["optimizer"])
    policy.scheduler.load_state_dict(ckpt["scheduler"])
    state.step, state.data_pos, state.last_sync = ckpt["step"], ckpt["data_pos"], ckpt["last_sync"]
    state.generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    random.setstate(ckpt["python_rng"])
    np.random.set_state(ckpt["numpy_rng"])
    state.synced_from = ckpt["synced_from"]
    if state.synced_from is not None:  # re-create the engine's stale copy, then the policy
        model.load_state_dict(state.synced_from)
        sync_weights(engine, model, state.last_sync)
        model.load_state_dict(ckpt["model"])
    elif state.last_sync >= 0:
        sync_weights(engine, model, state.last_sync)


def resume_run(run: Run, state: RunState, out_dir: Path, log) -> bool:
    """Continue from the latest good checkpoint (True), else from scratch; metrics and dumps
    past the restored step are dropped, so the redone steps are logged and dumped once."""
    found = load_latest_checkpoint(out_dir / "checkpoints", warn=log)
    if found:
        path, ckpt = found
        restore(ckpt, run.policy, run.engine, state)
        truncate_metrics(out_dir / "metrics.jsonl", state.step)
        log(f"resumed from {path} at step {state.step}")
    else:
        truncate_metrics(out_dir / "metrics.jsonl", -1)
        log("no checkpoint found: starting from scratch")
    if run.dumper is not None:
        from drpo.dumps import drop_steps_after

        drop_steps_after(run.dumper.directory, state.step)
    return bool(found)


def run_steps(cfg: Config, run: Run, state: RunState, logger: MetricsLogger, out_dir: Path, progress: bool) -> None:
    """The steps after `state.step`, each logged; evaluated and checkpointed on schedule."""
    last = {k: v for r in read_metrics(logger.path) for k, v in r.items()}
    t = cfg.train
    bar = tqdm(range(state.step + 1, t.steps + 1), desc="drpo train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        row = rl_step(run, state, step)  # sync -> rollout -> reward -> advantage -> update
        state.step = step
        if step % t.eval_every == 0 or step == t.steps:
            t_eval = time.perf_counter()
            row.update(evaluate(run.eval_engine, run.policy.model, run.sampler, step))
            row["time/eval"] = time.perf_counter() - t_eval
        logger.log(row)
        last.update(row)
        bar.set_postfix(
            reward=f"{row['reward/mean']:.3f}",
            eval_acc=f"{last.get('eval/accuracy', float('nan')):.3f}",
            mismatch=f"{row['mismatch/abs_log_ratio']:.2e}",
        )
        if step % t.save_every == 0 or (step == t.steps and t.save_final):
            save_checkpoint(out_dir / "checkpoints", step, checkpoint_state(run.policy, state), keep=t.keep_checkpoints)


def summarize(rows: list[dict], wall: float, warm: dict, resumed: bool) -> dict:
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "reward/mean" in r]
    tokens = combine("tokens/generated", [r.get("tokens/generated", 0) for r in steps])
    rollout_time = combine("time/rollout", [r.get("time/rollout", 0.0) for r in steps])
    return {
        "steps": max((r["step"] for r in rows), default=0),
        "warmstart_accuracy": evals[0][1] if evals and evals[0][0] == 0 else None,
        "final_accuracy": evals[-1][1] if evals else None,
        "best_accuracy": max((a for _, a in evals), default=None),
        "final_reward": steps[-1]["reward/mean"] if steps else None,
        "mean_mismatch": (combine("mismatch/abs_log_ratio", [r["mismatch/abs_log_ratio"] for r in steps])
                          if steps else None),
        "mean_long_tail_share": (combine("response/long_tail_frac", [r["response/long_tail_frac"] for r in steps])
                                 if steps and all("response/long_tail_frac" in r for r in steps) else None),
        "wall_clock_s": wall,
        "tokens_generated": tokens,
        "rollout_tokens_per_s": tokens / rollout_time if rollout_time > 0 else None,
        "warmstart": warm,
        "resumed": resumed,
    }


def disk_full_message(err: DiskFullError, out_dir: Path) -> str:
    kept = list_checkpoints(out_dir / "checkpoints")
    where = f"its last checkpoint, {kept[-1]}," if kept else "no checkpoint yet; metrics.jsonl"
    return (f"{err.strerror}. Nothing written before is lost ({where} and every complete metrics.jsonl "
            "line are intact); free disk space and continue with --resume")


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, log=print, progress: bool = True) -> dict:
    """Run (or, with resume, continue) one run in `out_dir`, holding the directory's lock."""
    out_dir = Path(out_dir)
    cfg = saved_config(out_dir, cfg, resume)
    task = make_task(cfg.task, cfg.seed)  # dataset errors stop the run before anything is written
    device = pick_device(cfg.train.device)
    try:
        with dir_lock(out_dir):
            return run_locked(cfg, task, device, out_dir, resume=resume, log=log, progress=progress)
    except LockHeldError as err:
        raise RunError(str(err)) from None
    except DiskFullError as err:
        raise RunError(disk_full_message(err, out_dir)) from None


def run_locked(cfg: Config, task: Task, device, out_dir: Path, *, resume: bool, log, progress: bool) -> dict:
    t_start = time.perf_counter()
    prepare_out_dir(out_dir, cfg, resume)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if note := loose_threshold_note(cfg.objective.method, cfg.objective.params):
        log(f"warning: {note}")
    state = RunState(generator=seed_everything(cfg.seed, device))
    run = setup(cfg, task, device, out_dir, log=log)
    found = resume_run(run, state, out_dir, log) if resume else False
    logger = MetricsLogger(out_dir, purge_step=state.step + 1 if found else 0 if resume else None)
    if state.step == 0 and not found:
        logger.log({"step": 0, **evaluate(run.eval_engine, run.policy.model, run.sampler, 0)})
    run_steps(cfg, run, state, logger, out_dir, progress)
    logger.close()
    if run.dumper is not None:
        run.dumper.close()

    rows = read_metrics(out_dir / "metrics.jsonl")
    plot_curves(rows, out_dir / "curves.png", title=f"{cfg.objective.method} / {cfg.model.name} / seed {cfg.seed}")
    summary = summarize(rows, time.perf_counter() - t_start, run.warm, resumed=found)
    # Written last: its presence marks a finished run.
    atomic_write(out_dir / "summary.json", json.dumps(jsonable(summary, nonfinite=str), indent=2), "summary")
    return summary
