"""Supervised warm start of the tiny default policy on the built-in task, so RL starts from a
partly competent policy. The result is cached (keyed by everything that determines it) and
shared across runs; writes are atomic and a file lock keeps concurrent runs from training
the same warm start twice. A warm start that spent its budget below the target is cached as a
miss: it stops the run (warmstart.on_miss=error) and is never served as a success."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from drpo.files import atomic_writer, file_lock
from drpo.models.logprobs import sequence_logprobs
from drpo.tasks import Task
from drpo.train.batching import decode_completions, encode_prompts, supervised_batch
from drpo.train.schedule import lr_factor

CACHE_VERSION = 3  # bump when the warm-start procedure changes


class WarmstartError(ValueError):
    """The SFT budget ran out below the target (a ValueError: the config asks for the
    impossible, so the CLI reports it without a traceback)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRPO_CACHE") or Path.home() / ".cache" / "drpo")


def examples_digest(task: Task, tokenizer, template: str, n: int = 32) -> str:
    """Hash of the first SFT examples as token ids: a task's wording, a dataset file's
    content or a tokenizer can change without any config key changing."""
    examples = [task.train_example(i) for i in range(SFT_OFFSET, SFT_OFFSET + n)]
    prompts = encode_prompts(tokenizer, examples, template)
    ids = [p + tokenizer(ex.answer, add_special_tokens=False)["input_ids"] for p, ex in zip(prompts, examples)]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:20]


def cache_key(cfg, device_type: str = "cpu", data: str = "") -> str:
    """Hash of everything that determines the warm-started weights: the settings, the data
    (`examples_digest`), the library versions and the device type whose kernels run the SFT
    (on_miss only decides what a miss does, cache_dir only where it is stored)."""
    ws = cfg.warmstart.model_dump(exclude={"cache_dir", "enabled", "on_miss"})
    spec = {
        "version": CACHE_VERSION,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(exclude={"system_prompt"}),
        "task": cfg.task.model_dump(),
        "warmstart": ws,
        "check_max_new_tokens": cfg.rollout.max_new_tokens,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device_type,
        "data": data,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def sft_loss(model, tokenizer, task: Task, indices: range, template: str) -> torch.Tensor:
    """Mean negative log-likelihood of answer + <eos> given the prompt."""
    examples = [task.train_example(i) for i in indices]
    prompts = encode_prompts(tokenizer, examples, template)
    answers = [tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for ex in examples]
    ids, attn, amask, p_len = supervised_batch(prompts, answers, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    logp = sequence_logprobs(model, ids.to(device), attn.to(device), response_start=p_len)
    amask = amask.to(device)
    return -(logp * amask).sum() / amask.sum()


SFT_OFFSET = 10**9  # RL consumes training indices from 0; SFT data come from a disjoint range
CHECK_OFFSET = 2 * 10**9  # and the competence checks from another one


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task: Task, indices: range, template: str, max_new_tokens: int) -> float:
    """Greedy accuracy on training-distribution problems, sampled with the fp32 rollout engine."""
    from drpo.rollout import generate, make_engine

    examples = [task.train_example(i) for i in indices]
    rollout = generate(
        make_engine(model, "fp32"), encode_prompts(tokenizer, examples, template), n_samples=1,
        max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        greedy=True,
    )
    texts = decode_completions(tokenizer, rollout.response_ids.cpu(), rollout.response_mask.cpu())
    return sum(task.reward(t, ex.answer) for t, ex in zip(texts, examples)) / len(examples)


def train_warmstart(model, tokenizer, task: Task, cfg, log=print) -> dict:
    """AdamW until the greedy accuracy check reaches warmstart.target_accuracy or
    warmstart.steps run out. Without a terminal (a log file, a study run) each check is
    logged as a line, so minutes of SFT are not silent."""
    ws, template = cfg.warmstart, cfg.task.prompt_template
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, ws.warmup_steps, ws.steps, ws.schedule)
    )
    check = range(CHECK_OFFSET, CHECK_OFFSET + ws.check_size)
    losses, accuracy, step = [], 0.0, 0
    bar = tqdm(total=ws.steps, desc="warm start (SFT)", leave=False, dynamic_ncols=True, disable=None)  # None: a terminal only
    while step < ws.steps:
        model.train()
        start = SFT_OFFSET + step * ws.batch_size
        loss = sft_loss(model, tokenizer, task, range(start, start + ws.batch_size), template)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % ws.check_every == 0 or step == ws.steps:
            model.eval()
            accuracy = greedy_accuracy(model, tokenizer, task, check, template, cfg.rollout.max_new_tokens)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accuracy:.3f}")
            if bar.disable:
                log(f"warm start: step {step}/{ws.steps}, loss {losses[-1]:.3f}, check accuracy {accuracy:.3f} "
                    f"(target {ws.target_accuracy})")
            if accuracy >= ws.target_accuracy:
                break
    bar.close()
    model.eval()
    return {
        "steps": step, "check_accuracy": accuracy, "reached": accuracy >= ws.target_accuracy,
        "target_accuracy": ws.target_accuracy, "final_loss": losses[-1] if losses else None, "losses": losses,
    }


def _miss_message(info: dict, cfg, path: Path) -> str:
    ws = cfg.warmstart
    return (
        f"warm start missed its target: greedy check accuracy {info['check_accuracy']:.3f} < "
        f"warmstart.target_accuracy={ws.target_accuracy} after all warmstart.steps={info['steps']} SFT steps "
        f"(seed {cfg.seed}; cached as a miss at {path}). Raise warmstart.steps, lower "
        "warmstart.target_accuracy, or set warmstart.on_miss=continue to run RL from this policy anyway"
    )


def _settle(info: dict, cfg, path: Path, log) -> None:
    """A miss stops the run unless warmstart.on_miss=continue, which only warns."""
    if info["reached"]:
        return
    if cfg.warmstart.on_miss == "error":
        raise WarmstartError(_miss_message(info, cfg, path))
    log(f"warning: {_miss_message(info, cfg, path)}; continuing (warmstart.on_miss=continue)")


def warm_start(model, tokenizer, task: Task, cfg, log=print) -> dict:
    """Load the cached warm start for `cfg` into `model`, training and caching it first if
    missing. Returns {"path", "cached", "steps", "check_accuracy", "reached",
    "target_accuracy", "final_loss"}; raises WarmstartError on a miss unless
    warmstart.on_miss=continue."""
    cache_dir = Path(cfg.warmstart.cache_dir) if cfg.warmstart.cache_dir else default_cache_dir()
    device = next(model.parameters()).device
    data = examples_digest(task, tokenizer, cfg.task.prompt_template)
    path = cache_dir / "warmstart" / f"{cache_key(cfg, device.type, data)}.pt"
    with file_lock(path.with_suffix(".lock")):  # waits: a concurrent run may be training this one
        blob = None
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                info = blob["info"]
                if not isinstance(info.get("reached"), bool):
                    raise ValueError("no hit/miss record")
            except Exception as err:  # a damaged cache entry is rebuilt, not trusted
                log(f"warning: warm-start cache {path} is unreadable ({err}); re-training it")
                blob = None
        if blob is not None:
            _settle(info, cfg, path, log)
            model.load_state_dict(blob["model"])
            log(f"warm start: loaded {path}")
            return {"path": str(path), "cached": True, **info}
        result = train_warmstart(model, tokenizer, task, cfg, log)
        info = {k: result[k] for k in ("steps", "check_accuracy", "reached", "target_accuracy", "final_loss")}
        with atomic_writer(path, "warmstart") as f:  # streamed, as checkpoints are
            torch.save({"model": model.state_dict(), "info": info, "losses": result["losses"]}, f)
        _settle(info, cfg, path, log)
        log(
            f"warm start: {info['steps']} SFT steps, check accuracy {info['check_accuracy']:.3f} "
            f"(target {cfg.warmstart.target_accuracy}), cached at {path}"
        )
        return {"path": str(path), "cached": False, **info}
