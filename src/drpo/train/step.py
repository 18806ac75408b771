"""One RL step, top to bottom (`rl_step`):

    weight sync -> prompts -> rollout (engine's own weights/precision) -> rewards
    -> group advantages -> updates_per_rollout optimizer steps on the objective -> metrics row
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from drpo.advantages import group_advantages
from drpo.objectives.diagnostics import long_tail, token_mismatch
from drpo.rollout import Rollout, sync_weights
from drpo.tasks import Example, Task
from drpo.train.metrics import combine
from drpo.train.setup import Policy, Run, weights_finite

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


def sync_if_due(engine, model, state: RunState, step: int, every: int) -> None:
    """Refresh the engine's weights every `every` steps (stale in between)."""
    if state.last_sync < 0 or step - state.last_sync >= every:
        sync_weights(engine, model, step)
        state.last_sync = step
        if every > 1:
            state.synced_from = {k: v.detach().clone() for k, v in model.state_dict().items()}


def next_prompts(task: Task, state: RunState, n: int) -> list[Example]:
    examples = [task.train_example(state.data_pos + i) for i in range(n)]
    state.data_pos += n
    return examples


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
        "response/long_tail_frac": float(long_tail(rollout.behaviour_logp)[rollout.response_mask].float().mean()),
        "tokens/generated": int(lengths.sum()),
    }


def chunked_logprobs(policy: Policy, rollout: Rollout, micro: int) -> torch.Tensor:
    """Train-side log-probs of the whole rollout batch, `micro` rows per forward, no gradient."""
    with torch.no_grad():
        return torch.cat([
            policy.logprobs(rollout.input_ids[s : s + micro], rollout.attention_mask[s : s + micro], rollout.prompt_len)
            for s in range(0, rollout.input_ids.shape[0], micro)
        ])


def microbatch_loss(policy: Policy, rollout: Rollout, idx, anchor, advantages):
    """(loss, objective diagnostics, train-side log-probs) of the samples `idx`."""
    logp = policy.logprobs(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len)
    loss, metrics = policy.loss(logp, anchor[idx], advantages[idx], rollout.response_mask[idx])
    # metrics already on the host (policy_loss's one transfer)
    if metrics["nonfinite_tokens"]:  # overflowing weights
        raise FloatingPointError(f"non-finite (or > 0) log-probs at {int(metrics['nonfinite_tokens'])} response tokens "
                                 f"(method {policy.method.name!r})")
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite loss {metrics['loss']} (method {policy.method.name!r})")
    return loss, metrics, logp


def reduce_objective_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """The objective's diagnostics of all micro-batches, each reduced as the metrics contract
    declares it (as objective/<name>)."""
    return {f"objective/{key}": float(combine(f"objective/{key}", [r[key] for r in rows])) for key in rows[0]}


def mismatch_sums(logp: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over response tokens, the sums of |log r| and k3 and the maxima of |log r| and |r - 1|
    (`token_mismatch`, r = pi_train / mu_rollout before any optimizer step), on the device."""
    lr, r, k3 = token_mismatch(logp.detach(), behaviour)
    abs_lr = lr.abs().masked_fill(~mask, 0.0)
    return {"abs": abs_lr.sum(), "k3": k3.masked_fill(~mask, 0.0).sum(), "max": abs_lr.max(),
            "ratio_dev": (r - 1).abs().masked_fill(~mask, 0.0).max(), "n": mask.sum()}


def mismatch_row(sums: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    n_tok = max(sum(float(m["n"]) for m in sums), 1.0)
    return {
        "mismatch/abs_log_ratio": sum(float(m["abs"]) for m in sums) / n_tok,
        "mismatch/k3_kl": sum(float(m["k3"]) for m in sums) / n_tok,
        "mismatch/max_abs_log_ratio": max(float(m["max"]) for m in sums),
        "mismatch/max_ratio_dev": max(float(m["ratio_dev"]) for m in sums),  # max |r - 1|
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
                mismatch.append(mismatch_sums(logp, rollout.behaviour_logp[idx], rollout.response_mask[idx]))
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), policy.grad_clip)))
        optimizer.step()
        if not weights_finite(model):
            raise FloatingPointError(f"non-finite weights after an optimizer step (grad norm {grad_norms[-1]}, "
                                     f"method {policy.method.name!r})")
        policy.scheduler.step()
    model.eval()
    return {
        **reduce_objective_metrics(obj_rows),
        **mismatch_row(mismatch),
        "grad_norm": combine("grad_norm", grad_norms),
        "grad_norm_max": combine("grad_norm_max", grad_norms),
        "lr": policy.scheduler.get_last_lr()[0],
    }


def dump_logprobs(policy: Policy, rollout: Rollout) -> torch.Tensor:
    micro = max(1, rollout.input_ids.shape[0] // (policy.minibatches * policy.microbatches))
    return chunked_logprobs(policy, rollout, micro)


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
