"""Supervised warm start of the tiny default policy on the built-in task, so RL starts from a
partly competent policy. The result is cached (keyed by everything that determines it) and
shared across runs; writes are atomic and a file lock keeps concurrent runs from training
the same warm start twice."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from drpo.logprobs import sequence_logprobs
from drpo.tasks import Task
from drpo.train.batching import encode_prompts, supervised_batch
from drpo.train.checkpoint import atomic_write_bytes

CACHE_VERSION = 1  # bump when the warm-start procedure changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRPO_CACHE") or Path.home() / ".cache" / "drpo")


def cache_key(cfg) -> str:
    """Hash of everything that determines the warm-started weights."""
    ws = cfg.warmstart.model_dump(exclude={"cache_dir", "enabled"})
    spec = {
        "version": CACHE_VERSION,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(exclude={"system_prompt"}),
        "task": cfg.task.model_dump(),
        "warmstart": ws,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def train_warmstart(model, tokenizer, task: Task, cfg) -> list[float]:
    """AdamW with linear warmup then cosine decay; the data are training problems drawn from
    the far end of the task's stream so RL's own prompts are not memorized beforehand."""
    ws = cfg.warmstart
    optimizer = torch.optim.AdamW(model.parameters(), lr=ws.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, ws.warmup_steps, ws.steps))
    offset = 10**9  # RL consumes indices from 0; the SFT data come from a disjoint range
    losses = []
    model.train()
    for step in tqdm(range(ws.steps), desc="warm start (SFT)", leave=False, dynamic_ncols=True):
        start = offset + step * ws.batch_size
        loss = sft_loss(model, tokenizer, task, range(start, start + ws.batch_size), cfg.task.prompt_template)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    import math

    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warm_start(model, tokenizer, task: Task, cfg, log=print) -> dict:
    """Load the cached warm start for `cfg` into `model`, training and caching it first if
    missing. Returns {"path", "cached", "final_loss"}."""
    cache_dir = Path(cfg.warmstart.cache_dir) if cfg.warmstart.cache_dir else default_cache_dir()
    path = cache_dir / "warmstart" / f"{cache_key(cfg)}.pt"
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(blob["model"])
                log(f"warm start: loaded {path}")
                return {"path": str(path), "cached": True, "final_loss": float(blob["final_loss"])}
            except Exception as err:  # a damaged cache entry is rebuilt, not trusted
                log(f"warning: warm-start cache {path} is unreadable ({err}); re-training it")
        losses = train_warmstart(model, tokenizer, task, cfg)
        final_loss = sum(losses[-10:]) / max(1, len(losses[-10:]))
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "final_loss": final_loss, "losses": losses}, buf)
        atomic_write_bytes(path, buf.getvalue())
        log(f"warm start: trained {cfg.warmstart.steps} steps (final loss {final_loss:.3f}), cached at {path}")
        return {"path": str(path), "cached": False, "final_loss": final_loss}
