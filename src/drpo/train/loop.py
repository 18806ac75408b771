"""The RLVR training loop, one short function per stage:

    prompts -> rollout (engine's own weights/precision) -> rewards -> group advantages
    -> updates_per_rollout optimizer steps on the policy objective -> weight sync -> log/eval/save

`train(cfg, out_dir, resume=False)` runs it and returns the summary dict.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from drpo.advantages import group_advantages
from drpo.models import build_tiny_model, encode_prompt, load_policy, make_char_tokenizer, quantized_forward
from drpo.models.bpe import task_tokenizer
from drpo.models.logprobs import sequence_logprobs
from drpo.objectives import policy_loss
from drpo.rollout import generate, make_engine, sync_weights
from drpo.tasks import Task, check_examples, make_task
from drpo.train.batching import decode_completions, encode_prompts
from drpo.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from drpo.train.config import Config, ConfigError, resume_config, to_yaml
from drpo.train.files import DiskFullError, LockHeldError, atomic_write, dir_lock, sweep_temp_files
from drpo.train.metrics import MetricsLogger, plot_curves, read_metrics, truncate_metrics
from drpo.train.schedule import lr_factor
from drpo.train.warmstart import warm_start

EVAL_BATCH = 128  # prompts per greedy eval batch
LOG_LONG_TAIL = math.log(0.01)  # sampled tokens with mu <= 0.01 are the long tail


class RunError(RuntimeError):
    """The output directory or a resume request is inconsistent."""


@dataclass
class RunState:
    """Everything besides model/optimizer weights that a resumed run needs."""

    step: int = 0  # RL steps completed
    data_pos: int = 0  # next training example index
    last_sync: int = -1  # step at which the rollout engine was last synced
    # Policy weights the engine was last synced from, kept only when sync_every > 1 so a
    # resumed run can rebuild the engine's stale copy exactly.
    synced_from: dict | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)


# ---------------------------------------------------------------- setup


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seeds the global RNGs and returns the generator that drives sampling and shuffles."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def load_model(cfg: Config, task: Task, device: torch.device, log=print):
    """The policy (fp32) and its tokenizer; the tiny default gets its cached warm start."""
    if cfg.model.is_tiny:
        m = cfg.model
        tokenizer = make_char_tokenizer() if m.tokenizer == "char" else task_tokenizer(task, m.vocab_size)
        model = build_tiny_model(
            tokenizer,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            intermediate_size=m.intermediate_size,
            max_position=m.max_position,
            seed=cfg.seed,
        ).to(device)
        check_task_fits(task, tokenizer, model, cfg)
        info = warm_start(model, tokenizer, task, cfg, log=log) if cfg.warmstart.enabled else {}
        return model, tokenizer, info
    model, tokenizer = load_policy(cfg.model.name, seed=cfg.seed)
    check_task_fits(task, tokenizer, model, cfg)
    return model.to(device), tokenizer, {}


def check_task_fits(task: Task, tokenizer, model, cfg: Config) -> None:
    """At load, not when an example is first sampled: every prompt and answer tokenizes and
    every prompt leaves room for max_new_tokens in the model's positions."""
    check_examples(
        task,
        encode_prompt=lambda text: encode_prompt(tokenizer, cfg.task.prompt_template.format(prompt=text),
                                                 system=cfg.model.system_prompt),
        encode_answer=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        unk_id=tokenizer.unk_token_id,
        max_positions=getattr(model.config, "max_position_embeddings", None),
        max_new_tokens=cfg.rollout.max_new_tokens,
        positions_key="model.max_position" if cfg.model.is_tiny else f"max_position_embeddings of {cfg.model.name}",
    )


def make_optimizer(model, cfg: Config):
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    total = cfg.train.steps * o.updates_per_rollout  # optimizer steps in the run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, total, o.schedule)
    )
    return optimizer, scheduler


def prepare_out_dir(out_dir: Path, cfg: Config, resume: bool) -> None:
    """Called with the directory's lock held."""
    has_run = (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists()
    if has_run and not resume:
        raise RunError(f"output directory {out_dir} already holds a run; pass --resume to continue it or pick another --out")
    if not (resume and (out_dir / "config.yaml").exists()):  # a resumed run keeps the saved one
        atomic_write(out_dir / "config.yaml", to_yaml(cfg), "config")
    (out_dir / "summary.json").unlink(missing_ok=True)  # its presence must mean "finished"
    sweep_temp_files(out_dir)


def saved_config(out_dir: Path, cfg: Config, resume: bool) -> Config:
    """What a resumed run continues with: its saved config, checked against the keys set now."""
    saved = out_dir / "config.yaml"
    if not (resume and saved.is_file()):
        return cfg
    try:
        return resume_config(saved.read_text(), cfg, str(saved))
    except ConfigError as err:
        raise RunError(str(err)) from None


def disk_full_message(err: DiskFullError, out_dir: Path) -> str:
    kept = list_checkpoints(out_dir / "checkpoints")
    where = f"its last checkpoint, {kept[-1]}," if kept else "no checkpoint yet; metrics.jsonl"
    return (f"{err.strerror}. Nothing written before is lost ({where} and every complete metrics.jsonl "
            "line are intact); free disk space and continue with --resume")


# ---------------------------------------------------------------- one step


def next_prompts(task: Task, state: RunState, n: int):
    examples = [task.train_example(state.data_pos + i) for i in range(n)]
    state.data_pos += n
    return examples


def sample(engine, tokenizer, examples, cfg: Config, generator, *, greedy=False, n_samples=None):
    prompts = encode_prompts(tokenizer, examples, cfg.task.prompt_template, system=cfg.model.system_prompt)
    r = cfg.rollout
    return generate(
        engine,
        prompts,
        n_samples=r.n_samples if n_samples is None else n_samples,
        max_new_tokens=r.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        greedy=greedy,
        generator=generator,
    )


def score(task: Task, tokenizer, rollout, examples, n_samples: int) -> tuple[torch.Tensor, list[str]]:
    """One reward per sample; rows i*G..(i+1)*G-1 belong to examples[i]."""
    texts = decode_completions(tokenizer, rollout.response_ids.cpu(), rollout.response_mask.cpu())
    answers = [ex.answer for ex in examples for _ in range(n_samples)]
    rewards = torch.tensor([task.reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)
    return rewards, texts


def policy_logprobs(model, input_ids, attention_mask, prompt_len: int, cfg: Config):
    """Train-side log-probs of the response tokens at the sampling temperature, through the
    rollout precision's training forward (quantized under fp8_e2e, plain otherwise)."""
    with quantized_forward(model, cfg.rollout.precision):
        return sequence_logprobs(
            model, input_ids, attention_mask, response_start=prompt_len, temperature=cfg.rollout.temperature
        )


def anchor_logprobs(model, rollout, cfg: Config, micro: int) -> torch.Tensor:
    """The 'old' log-probs: the rollout's behaviour log-probs (default) or a train-side
    recomputation before the first update."""
    if cfg.objective.anchor == "rollout":
        return rollout.behaviour_logp
    with torch.no_grad():
        parts = [
            policy_logprobs(model, rollout.input_ids[s : s + micro], rollout.attention_mask[s : s + micro], rollout.prompt_len, cfg)
            for s in range(0, rollout.input_ids.shape[0], micro)
        ]
    return torch.cat(parts)


def mismatch_stats(logp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over response tokens of |log r|, the k3 KL estimate and the max |log r|, where
    r = pi_train / mu_rollout before any optimizer step."""
    lr = (logp.detach() - behaviour).masked_fill(~mask, 0.0)
    k3 = (torch.exp(lr) - 1 - lr).masked_fill(~mask, 0.0)
    dev = (torch.exp(lr) - 1).abs()
    return {"abs": lr.abs().sum(), "k3": k3.sum(), "max": lr.abs().max(), "ratio_dev": dev.max(), "n": mask.sum()}


def reduce_objective_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Diagnostics of all micro-batches: extremes for min/max, sum for counts, else mean."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if key.endswith("_min"):
            out[key] = min(vals)
        elif key.endswith("_max"):
            out[key] = max(vals)
        elif key in ("tokens", "nonfinite_tokens"):  # counts
            out[key] = float(sum(vals))
        else:
            out[key] = float(sum(vals) / len(vals))
    return out


def microbatch_loss(model, rollout, idx, anchor, advantages, cfg: Config):
    """(loss, objective diagnostics, train-side log-probs) of the samples `idx`."""
    obj = cfg.objective
    logp = policy_logprobs(model, rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len, cfg)
    if not bool(torch.isfinite(logp.detach()[rollout.response_mask[idx].bool()]).all()):  # overflowing weights
        raise FloatingPointError(f"non-finite log-probs of the policy (method {obj.method!r})")
    loss, metrics = policy_loss(
        obj.method, logp, anchor[idx], advantages[idx], rollout.response_mask[idx],
        agg=obj.agg, horizon=obj.horizon, **obj.resolved_params,
    )
    if not math.isfinite(metrics["loss"]):  # already on the host: policy_loss's one transfer
        raise FloatingPointError(f"non-finite loss {metrics['loss']} (method {obj.method!r})")
    return loss, metrics, logp


def mismatch_row(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    n_tok = max(sum(float(m["n"]) for m in stats), 1.0)
    return {
        "mismatch/abs_log_ratio": sum(float(m["abs"]) for m in stats) / n_tok,
        "mismatch/k3_kl": sum(float(m["k3"]) for m in stats) / n_tok,
        "mismatch/max_abs_log_ratio": max(float(m["max"]) for m in stats),
        "mismatch/max_ratio_dev": max(float(m["ratio_dev"]) for m in stats),  # max |r - 1|
    }


def update(model, optimizer, scheduler, rollout, advantages, cfg: Config, generator) -> dict[str, float]:
    """updates_per_rollout optimizer steps, each over one shuffled mini-batch split into
    grad_accum micro-batches. The mismatch is measured on the first mini-batch, before any
    optimizer step."""
    o = cfg.optim
    n = rollout.input_ids.shape[0]
    mini = n // o.updates_per_rollout
    micro = mini // o.grad_accum
    model.train()
    anchor = anchor_logprobs(model, rollout, cfg, micro)
    order = torch.randperm(n, generator=generator, device=generator.device).to(rollout.input_ids.device)
    obj_rows, grad_norms, mismatch = [], [], []
    for u in range(o.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        for a in range(o.grad_accum):
            idx = order[u * mini + a * micro : u * mini + (a + 1) * micro]
            loss, metrics, logp = microbatch_loss(model, rollout, idx, anchor, advantages, cfg)
            (loss / o.grad_accum).backward()
            obj_rows.append(metrics)
            if u == 0:
                mismatch.append(mismatch_stats(logp, rollout.behaviour_logp[idx], rollout.response_mask[idx]))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)))
        optimizer.step()
        if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
            raise FloatingPointError(f"non-finite weights after an optimizer step (grad norm {grad_norms[-1]}, "
                                     f"method {cfg.objective.method!r})")
        scheduler.step()
    model.eval()
    return {
        **{f"objective/{k}": v for k, v in reduce_objective_metrics(obj_rows).items()},
        **mismatch_row(mismatch),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "grad_norm_max": max(grad_norms),
        "lr": scheduler.get_last_lr()[0],
    }


@torch.no_grad()
def evaluate(eval_engine, model, tokenizer, task: Task, cfg: Config, step: int) -> dict[str, float]:
    """Greedy accuracy on the held-out split, sampled from a freshly synced copy of the policy
    at the rollout precision (what a deployment would serve)."""
    sync_weights(eval_engine, model, step)
    examples = list(task.eval_examples)
    correct, lengths = 0.0, 0.0
    for s in range(0, len(examples), EVAL_BATCH):
        batch = examples[s : s + EVAL_BATCH]
        rollout = sample(eval_engine, tokenizer, batch, cfg, None, greedy=True, n_samples=1)
        rewards, _ = score(task, tokenizer, rollout, batch, 1)
        correct += float(rewards.sum())
        lengths += float(rollout.response_mask.sum())
    return {"eval/accuracy": correct / len(examples), "eval/response_length": lengths / len(examples)}


# ---------------------------------------------------------------- rollout dumps (opt-in)


def make_dumper(cfg: Config, out_dir: Path):
    """The `drpo inspect` dump writer of this run, or None (cfg.dump.every == 0)."""
    if not cfg.dump.every:
        return None
    from drpo.inspect.dump import DumpWriter

    r = cfg.rollout
    meta = {
        "source": "drpo_train",
        "model": cfg.model.name,
        "method": cfg.objective.method,
        "params": cfg.objective.resolved_params,
        "anchor": cfg.objective.anchor,
        "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "precision": r.precision},
        "tokenizer": None if cfg.model.is_tiny else cfg.model.name,
        "columns": {
            "logp_rollout": f"rollout engine ({r.precision}) log-prob of the sampled token under the sampling "
                            "distribution (temperature, top-p, top-k applied)",
            "logp_before": "train-side (fp32) log-prob at the sampling temperature, before the step's update",
            "logp_after": "train-side log-prob after the step's optimizer steps",
        },
    }
    return DumpWriter(out_dir / cfg.dump.dir, every=cfg.dump.every, metadata=meta)


@torch.no_grad()
def dump_logprobs(model, rollout, cfg: Config) -> torch.Tensor:
    micro = max(1, rollout.input_ids.shape[0] // (cfg.optim.updates_per_rollout * cfg.optim.grad_accum))
    return torch.cat([
        policy_logprobs(model, rollout.input_ids[s : s + micro], rollout.attention_mask[s : s + micro], rollout.prompt_len, cfg)
        for s in range(0, rollout.input_ids.shape[0], micro)
    ])


def rl_step(step, model, engine, optimizer, scheduler, tokenizer, task, cfg: Config, state: RunState, dumper=None) -> dict:
    r = cfg.rollout
    if state.last_sync < 0 or step - state.last_sync >= r.sync_every:
        sync_weights(engine, model, step)
        state.last_sync = step
        if r.sync_every > 1:
            state.synced_from = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    examples = next_prompts(task, state, r.prompts_per_step)
    rollout = sample(engine, tokenizer, examples, cfg, state.generator)
    t1 = time.perf_counter()
    rewards, _ = score(task, tokenizer, rollout, examples, r.n_samples)
    adv = group_advantages(rewards, r.n_samples, cfg.advantage.estimator).to(rollout.behaviour_logp.device)
    t2 = time.perf_counter()
    dumping = dumper is not None and dumper.due(step)
    before = dump_logprobs(model, rollout, cfg) if dumping else None
    row = update(model, optimizer, scheduler, rollout, adv, cfg, state.generator)
    t3 = time.perf_counter()
    if dumping:
        dumper.write(
            step=step, response_mask=rollout.response_mask, logp_rollout=rollout.behaviour_logp, logp_before=before,
            logp_after=dump_logprobs(model, rollout, cfg) if cfg.dump.after else None, advantage=adv,
            token_ids=rollout.response_ids, group_id=rollout.group_index,
        )
        dumper.close()  # a complete shard per dumped step: a killed run keeps every step dumped before
    lengths = rollout.response_lengths.float()
    groups = rewards.view(-1, r.n_samples)
    row = {
        "step": step,
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)),
        "reward/accuracy": float((rewards >= 1.0).float().mean()),
        "advantage/zero_groups_frac": float((groups.max(1).values == groups.min(1).values).float().mean()),
        "response/length": float(lengths.mean()),
        "response/finished_frac": float(rollout.finished.float().mean()),
        # Share of sampled tokens with behaviour probability mu <= 0.01 (the long tail).
        "response/long_tail_frac": float(
            (rollout.behaviour_logp <= LOG_LONG_TAIL)[rollout.response_mask].float().mean()
        ),
        "tokens/generated": int(lengths.sum()),
        "staleness": step - rollout.weights_step,
        **row,
        "time/rollout": t1 - t0,
        "time/reward": t2 - t1,
        "time/update": t3 - t2,
    }
    return row


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(model, optimizer, scheduler, state: RunState) -> dict:
    return {
        "model": model.state_dict(),
        "synced_from": state.synced_from,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state.step,
        "data_pos": state.data_pos,
        "last_sync": state.last_sync,
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }


def restore(ckpt: dict, model, engine, optimizer, scheduler, state: RunState) -> None:
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
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


# ---------------------------------------------------------------- the run


def summarize(rows: list[dict], wall: float, warm: dict, resumed: bool) -> dict:
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "reward/mean" in r]
    tokens = sum(r.get("tokens/generated", 0) for r in steps)
    rollout_time = sum(r.get("time/rollout", 0.0) for r in steps)
    return {
        "steps": max((r["step"] for r in rows), default=0),
        "warmstart_accuracy": evals[0][1] if evals and evals[0][0] == 0 else None,
        "final_accuracy": evals[-1][1] if evals else None,
        "best_accuracy": max((a for _, a in evals), default=None),
        "final_reward": steps[-1]["reward/mean"] if steps else None,
        "mean_mismatch": sum(r["mismatch/abs_log_ratio"] for r in steps) / len(steps) if steps else None,
        "mean_long_tail_share": (sum(r["response/long_tail_frac"] for r in steps) / len(steps)
                                 if steps and all("response/long_tail_frac" in r for r in steps) else None),
        "wall_clock_s": wall,
        "tokens_generated": tokens,
        "rollout_tokens_per_s": tokens / rollout_time if rollout_time > 0 else None,
        "warmstart": warm,
        "resumed": resumed,
    }


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
    state = RunState(generator=seed_everything(cfg.seed, device))
    model, tokenizer, warm = load_model(cfg, task, device, log=log)
    optimizer, scheduler = make_optimizer(model, cfg)
    engine = make_engine(model, cfg.rollout.precision)
    eval_engine = make_engine(model, cfg.rollout.precision)

    found = load_latest_checkpoint(out_dir / "checkpoints", warn=log) if resume else None
    if found:
        path, ckpt = found
        restore(ckpt, model, engine, optimizer, scheduler, state)
        truncate_metrics(out_dir / "metrics.jsonl", state.step)
        log(f"resumed from {path} at step {state.step}")
    elif resume:
        truncate_metrics(out_dir / "metrics.jsonl", -1)
        log("no checkpoint found: starting from scratch")
    logger = MetricsLogger(out_dir, purge_step=state.step + 1 if found else 0 if resume else None)

    if state.step == 0 and not found:
        logger.log({"step": 0, **evaluate(eval_engine, model, tokenizer, task, cfg, 0)})
    last = {k: v for r in read_metrics(logger.path) for k, v in r.items()}
    dumper = make_dumper(cfg, out_dir)
    bar = tqdm(range(state.step + 1, cfg.train.steps + 1), desc="drpo train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        row = rl_step(step, model, engine, optimizer, scheduler, tokenizer, task, cfg, state, dumper)
        state.step = step
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            t_eval = time.perf_counter()
            row.update(evaluate(eval_engine, model, tokenizer, task, cfg, step))
            row["time/eval"] = time.perf_counter() - t_eval
        logger.log(row)
        last.update(row)
        bar.set_postfix(
            reward=f"{row['reward/mean']:.3f}",
            eval_acc=f"{last.get('eval/accuracy', float('nan')):.3f}",
            mismatch=f"{row['mismatch/abs_log_ratio']:.2e}",
        )
        if step % cfg.train.save_every == 0 or (step == cfg.train.steps and cfg.train.save_final):
            save_checkpoint(
                out_dir / "checkpoints", step, checkpoint_state(model, optimizer, scheduler, state),
                keep=cfg.train.keep_checkpoints,
            )
    logger.close()
    if dumper is not None:
        dumper.close()

    rows = read_metrics(out_dir / "metrics.jsonl")
    plot_curves(rows, out_dir / "curves.png", title=f"{cfg.objective.method} / {cfg.model.name} / seed {cfg.seed}")
    summary = summarize(rows, time.perf_counter() - t_start, warm, resumed=bool(found))
    # Written last: its presence marks a finished run.
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2), "summary")
    return summary
