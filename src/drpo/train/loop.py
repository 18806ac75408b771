"""The RLVR training loop. `train(cfg, out_dir, resume=False)` resolves the config once into
the run's components (the policy with its optimizer, training forward and bound objective; the
sampler with its prompt encoding and sampling parameters; the rollout engines), then runs each
step top to bottom:

    weight sync -> prompts -> rollout (engine's own weights/precision) -> rewards
    -> group advantages -> updates_per_rollout optimizer steps on the objective -> log/eval/save

and returns the summary dict.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from drpo.advantages import group_advantages
from drpo.models import build_tiny_model, encode_prompt, load_policy, make_char_tokenizer, quantized_forward
from drpo.models.bpe import task_tokenizer
from drpo.models.logprobs import NonFiniteError, sequence_logprobs
from drpo.objectives import get_method, loose_threshold_note, policy_loss
from drpo.objectives.diagnostics import LONG_TAIL_MU
from drpo.rollout import Rollout, RolloutEngine, SamplingParams, generate, make_engine, sync_weights
from drpo.tasks import Example, Task, check_examples, make_task
from drpo.train.batching import decode_completions, encode_prompts
from drpo.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from drpo.train.config import Config, ConfigError, resume_config, to_yaml
from drpo.files import DiskFullError, LockHeldError, atomic_write, dir_lock, sweep_temp_files
from drpo.train.metrics import MetricsLogger, combine, plot_curves, read_metrics, truncate_metrics
from drpo.train.schedule import lr_factor
from drpo.train.warmstart import warm_start

EVAL_BATCH = 128  # prompts per greedy eval batch
LOG_LONG_TAIL = math.log(LONG_TAIL_MU)  # sampled tokens with mu <= LONG_TAIL_MU are the long tail


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


def weights_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


@dataclass(frozen=True)
class Policy:
    """The trainer side, bound once at setup: the policy, its optimizer and lr schedule, its
    training forward at the rollout precision and the objective with its parameters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    forward: Callable  # model -> context manager: the training forward (fp8-quantized under fp8_e2e)
    temperature: float  # train-side log-probs are of the distribution sampled from
    loss: Callable  # (logp, anchor, advantages, mask) -> (loss, metrics): the method, its params, agg
    method: str  # named in errors
    recompute_anchor: bool  # anchor = train-side log-probs before the first update (else the rollout's)
    minibatches: int  # optimizer steps per rollout batch
    microbatches: int  # micro-batches per optimizer step
    grad_clip: float

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Train-side log-probs of the response tokens at the sampling temperature. A NaN/inf
        in the forward's hidden states or LM head is a divergence (FloatingPointError): its
        inputs are token ids, so only the policy's own numbers can have overflowed."""
        try:
            with self.forward(self.model):
                return sequence_logprobs(self.model, input_ids, attention_mask, response_start=prompt_len,
                                         temperature=self.temperature)
        except NonFiniteError as err:  # other ValueErrors are bad input and stay errors
            weights = "finite" if weights_finite(self.model) else "non-finite"
            raise FloatingPointError(f"the policy's forward overflowed: {err} (its weights are {weights}; "
                                     f"method {self.method!r})") from err


def make_policy(model, cfg: Config) -> Policy:
    o, obj = cfg.optim, cfg.objective
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    total = cfg.train.steps * o.updates_per_rollout  # optimizer steps in the run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, total, o.schedule)
    )
    method = get_method(obj.method)
    # nonfinite="drop": a NaN/inf log-prob is counted in the metrics the loss already brings to the
    # host, and microbatch_loss turns a nonzero count into a divergence (no sync of its own)
    loss = partial(policy_loss, method, agg=obj.agg, horizon=obj.horizon, nonfinite="drop",
                   **method.resolve_params(obj.params))
    return Policy(
        model=model, optimizer=optimizer, scheduler=scheduler,
        forward=partial(quantized_forward, precision=cfg.rollout.precision), temperature=cfg.rollout.temperature,
        loss=loss, method=method.name, recompute_anchor=obj.anchor == "recompute",
        minibatches=o.updates_per_rollout, microbatches=o.grad_accum, grad_clip=o.grad_clip,
    )


@dataclass(frozen=True)
class Sampler:
    """The rollout side, bound once at setup: the task, its prompts' encoding (template, chat
    template, system turn), the sampling parameters, and decoding and scoring."""

    task: Task
    tokenizer: Any
    encode: Callable[[list[Example]], list[list[int]]]
    sampling: SamplingParams  # the rollouts'
    greedy: SamplingParams  # evaluation's: one greedy completion per prompt

    def sample(self, engine, examples: list[Example], generator, params: SamplingParams | None = None) -> Rollout:
        params = self.sampling if params is None else params
        return generate(engine, self.encode(examples), params, generator=generator)

    def score(self, rollout: Rollout, examples: list[Example]) -> torch.Tensor:
        """One reward per sample; rows i*n..(i+1)*n-1 belong to examples[i]."""
        texts = decode_completions(self.tokenizer, rollout.response_ids.cpu(), rollout.response_mask.cpu())
        n = len(texts) // len(examples)
        answers = [ex.answer for ex in examples for _ in range(n)]
        return torch.tensor([self.task.reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)


def make_sampler(cfg: Config, task: Task, tokenizer) -> Sampler:
    r = cfg.rollout
    sampling = SamplingParams(
        n_samples=r.n_samples, max_new_tokens=r.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
    )
    encode = partial(encode_prompts, tokenizer, template=cfg.task.prompt_template, system=cfg.model.system_prompt)
    return Sampler(task, tokenizer, encode, sampling, replace(sampling, n_samples=1, greedy=True))


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


def next_prompts(task: Task, state: RunState, n: int) -> list[Example]:
    examples = [task.train_example(state.data_pos + i) for i in range(n)]
    state.data_pos += n
    return examples


def sync_if_due(engine, model, state: RunState, step: int, every: int) -> None:
    """Refresh the engine's weights every `every` steps (stale in between)."""
    if state.last_sync < 0 or step - state.last_sync >= every:
        sync_weights(engine, model, step)
        state.last_sync = step
        if every > 1:
            state.synced_from = {k: v.detach().clone() for k, v in model.state_dict().items()}


def rollout_metrics(rollout: Rollout, rewards: torch.Tensor, n_samples: int) -> dict[str, float]:
    lengths = rollout.response_lengths.float()
    groups = rewards.view(-1, n_samples)
    return {
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
    }


def chunked_logprobs(policy: Policy, rollout: Rollout, micro: int) -> torch.Tensor:
    """Train-side log-probs of the whole rollout batch, `micro` rows per forward, no gradient."""
    with torch.no_grad():
        return torch.cat([
            policy.logprobs(rollout.input_ids[s : s + micro], rollout.attention_mask[s : s + micro], rollout.prompt_len)
            for s in range(0, rollout.input_ids.shape[0], micro)
        ])


def mismatch_stats(logp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over response tokens of |log r|, the k3 KL estimate and the max |log r|, where
    r = pi_train / mu_rollout before any optimizer step."""
    lr = (logp.detach() - behaviour).masked_fill(~mask, 0.0)
    k3 = (torch.exp(lr) - 1 - lr).masked_fill(~mask, 0.0)
    dev = (torch.exp(lr) - 1).abs()
    return {"abs": lr.abs().sum(), "k3": k3.sum(), "max": lr.abs().max(), "ratio_dev": dev.max(), "n": mask.sum()}


def reduce_objective_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The objective's diagnostics of all micro-batches, each reduced as the metrics contract
    declares it (as objective/<name>)."""
    return {f"objective/{key}": float(combine(f"objective/{key}", [r[key] for r in rows])) for key in rows[0]}


def microbatch_loss(policy: Policy, rollout: Rollout, idx, anchor, advantages):
    """(loss, objective diagnostics, train-side log-probs) of the samples `idx`."""
    logp = policy.logprobs(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len)
    loss, metrics = policy.loss(logp, anchor[idx], advantages[idx], rollout.response_mask[idx])
    # both read from the metrics already on the host (policy_loss's one transfer)
    if metrics["nonfinite_tokens"]:  # overflowing weights
        raise FloatingPointError(f"non-finite (or > 0) log-probs at {int(metrics['nonfinite_tokens'])} response tokens "
                                 f"(method {policy.method!r})")
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']} (method {policy.method!r})")
    return loss, metrics, logp


def mismatch_row(stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    n_tok = max(sum(float(m["n"]) for m in stats), 1.0)
    return {
        "mismatch/abs_log_ratio": sum(float(m["abs"]) for m in stats) / n_tok,
        "mismatch/k3_kl": sum(float(m["k3"]) for m in stats) / n_tok,
        "mismatch/max_abs_log_ratio": max(float(m["max"]) for m in stats),
        "mismatch/max_ratio_dev": max(float(m["ratio_dev"]) for m in stats),  # max |r - 1|
    }


def update(policy: Policy, rollout: Rollout, advantages: torch.Tensor, generator) -> dict[str, float]:
    """`minibatches` optimizer steps, each over one shuffled mini-batch split into
    `microbatches` micro-batches. The mismatch is measured on the first mini-batch, before
    any optimizer step."""
    model, optimizer = policy.model, policy.optimizer
    n = rollout.input_ids.shape[0]
    mini = n // policy.minibatches
    micro = mini // policy.microbatches
    model.train()
    anchor = chunked_logprobs(policy, rollout, micro) if policy.recompute_anchor else rollout.behaviour_logp
    order = torch.randperm(n, generator=generator, device=generator.device).to(rollout.input_ids.device)
    obj_rows, grad_norms, mismatch = [], [], []
    for u in range(policy.minibatches):
        optimizer.zero_grad(set_to_none=True)
        for a in range(policy.microbatches):
            idx = order[u * mini + a * micro : u * mini + (a + 1) * micro]
            loss, metrics, logp = microbatch_loss(policy, rollout, idx, anchor, advantages)
            (loss / policy.microbatches).backward()
            obj_rows.append(metrics)
            if u == 0:
                mismatch.append(mismatch_stats(logp, rollout.behaviour_logp[idx], rollout.response_mask[idx]))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), policy.grad_clip)))
        optimizer.step()
        if not weights_finite(model):
            raise FloatingPointError(f"non-finite weights after an optimizer step (grad norm {grad_norms[-1]}, "
                                     f"method {policy.method!r})")
        policy.scheduler.step()
    model.eval()
    return {
        **reduce_objective_metrics(obj_rows),
        **mismatch_row(mismatch),
        "grad_norm": combine("grad_norm", grad_norms),
        "grad_norm_max": combine("grad_norm_max", grad_norms),
        "lr": policy.scheduler.get_last_lr()[0],
    }


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


# ---------------------------------------------------------------- rollout dumps (opt-in)


def make_dumper(cfg: Config, out_dir: Path):
    """The `drpo inspect` dump writer of this run, or None (cfg.dump.every == 0)."""
    if not cfg.dump.every:
        return None
    from drpo.dumps import DumpWriter

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


def dump_logprobs(policy: Policy, rollout: Rollout) -> torch.Tensor:
    micro = max(1, rollout.input_ids.shape[0] // (policy.minibatches * policy.microbatches))
    return chunked_logprobs(policy, rollout, micro)


# ---------------------------------------------------------------- setup and step


@dataclass(frozen=True)
class Run:
    """A run's components, resolved from the config once (`setup`); `rl_step` and
    `evaluate` take them from here instead of reading the config again."""

    policy: Policy
    sampler: Sampler
    engine: RolloutEngine  # samples the rollouts; synced every `sync_every` steps
    eval_engine: RolloutEngine  # evaluation's copy; synced before each eval
    prompts_per_step: int
    sync_every: int
    estimator: str  # group advantage estimator
    dumper: Any = None  # the run's `drpo inspect` DumpWriter (imported only when dumping), or None
    dump_after: bool = True  # also dump the train-side log-probs after the update
    warm: dict = field(default_factory=dict)  # the warm start's record (tiny model)


def setup(cfg: Config, task: Task, device, out_dir: Path | None = None, log=print) -> Run:
    """Everything a run needs, built once from `cfg`: the policy (warm-started), its
    optimizer, training forward and objective, the sampler, the two engines, the dumper."""
    model, tokenizer, warm = load_model(cfg, task, device, log=log)
    return Run(
        policy=make_policy(model, cfg),
        sampler=make_sampler(cfg, task, tokenizer),
        engine=make_engine(model, cfg.rollout.precision),
        eval_engine=make_engine(model, cfg.rollout.precision),
        prompts_per_step=cfg.rollout.prompts_per_step,
        sync_every=cfg.rollout.sync_every,
        estimator=cfg.advantage.estimator,
        dumper=make_dumper(cfg, out_dir) if out_dir is not None else None,
        dump_after=cfg.dump.after,
        warm=warm,
    )


def rl_step(run: Run, state: RunState, step: int) -> dict:
    """One RL step, the pipeline top to bottom; returns its metrics row."""
    policy, sampler, dumper = run.policy, run.sampler, run.dumper
    sync_if_due(run.engine, policy.model, state, step, run.sync_every)
    t0 = time.perf_counter()
    examples = next_prompts(sampler.task, state, run.prompts_per_step)
    rollout = sampler.sample(run.engine, examples, state.generator)
    t1 = time.perf_counter()
    rewards = sampler.score(rollout, examples)
    advantages = group_advantages(rewards, sampler.sampling.n_samples, run.estimator).to(rollout.behaviour_logp.device)
    t2 = time.perf_counter()
    dumping = dumper is not None and dumper.due(step)
    before = dump_logprobs(policy, rollout) if dumping else None
    update_row = update(policy, rollout, advantages, state.generator)
    t3 = time.perf_counter()
    if dumping:
        dumper.write(
            step=step, response_mask=rollout.response_mask, logp_rollout=rollout.behaviour_logp, logp_before=before,
            logp_after=dump_logprobs(policy, rollout) if run.dump_after else None, advantage=advantages,
            token_ids=rollout.response_ids, group_id=rollout.group_index,
        )
        dumper.close()  # a complete shard per dumped step: a killed run keeps every step dumped before
    return {
        "step": step,
        **rollout_metrics(rollout, rewards, sampler.sampling.n_samples),
        "staleness": step - rollout.weights_step,
        **update_row,
        "time/rollout": t1 - t0,
        "time/reward": t2 - t1,
        "time/update": t3 - t2,
    }


# ---------------------------------------------------------------- checkpoints


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


# ---------------------------------------------------------------- the run


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

    found = load_latest_checkpoint(out_dir / "checkpoints", warn=log) if resume else None
    if found:
        path, ckpt = found
        restore(ckpt, run.policy, run.engine, state)
        truncate_metrics(out_dir / "metrics.jsonl", state.step)
        log(f"resumed from {path} at step {state.step}")
    elif resume:
        truncate_metrics(out_dir / "metrics.jsonl", -1)
        log("no checkpoint found: starting from scratch")
    if resume and run.dumper is not None:  # the redone steps are dumped again, once
        from drpo.dumps import drop_steps_after

        drop_steps_after(run.dumper.directory, state.step)
    logger = MetricsLogger(out_dir, purge_step=state.step + 1 if found else 0 if resume else None)

    if state.step == 0 and not found:
        logger.log({"step": 0, **evaluate(run.eval_engine, run.policy.model, run.sampler, 0)})
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
    logger.close()
    if run.dumper is not None:
        run.dumper.close()

    rows = read_metrics(out_dir / "metrics.jsonl")
    plot_curves(rows, out_dir / "curves.png", title=f"{cfg.objective.method} / {cfg.model.name} / seed {cfg.seed}")
    summary = summarize(rows, time.perf_counter() - t_start, run.warm, resumed=bool(found))
    # Written last: its presence marks a finished run.
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2), "summary")
    return summary
