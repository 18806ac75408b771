"""`drpo mismatch`: the training-inference mismatch of each rollout precision. Samples with an
engine in that precision, recomputes the sampled tokens' log-probs with the trainer's forward
(fp32; the fp8-quantized forward under fp8_e2e), and compares. Also reports what sets the
regime: the long-tail share (sampled tokens with behaviour probability mu <= 0.01), the
response length, and the mismatch on long-tail tokens against the rest.

    drpo mismatch --config configs/testbed.yaml   # the testbed policy
    drpo mismatch --policy tiny
    drpo mismatch --policy smollm2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from tqdm import tqdm

from drpo.files import atomic_write, jsonable
from drpo.models import encode_prompt, load_policy, quantized_forward
from drpo.models.logprobs import sequence_logprobs
from drpo.objectives.diagnostics import LONG_TAIL_MU, long_tail, token_mismatch
from drpo.precisions import PRECISIONS
from drpo.rollout.engine import generate, make_engine

DEFAULT_QUESTIONS = ("What is 17+25?", "What is 3*4?", "Compute 120-45.", "What is 9+10?")


def _abs_log_ratio(train_logp, behaviour_logp, mask) -> torch.Tensor:
    return token_mismatch(train_logp, behaviour_logp).log_ratio[mask].abs().double()


def token_mismatch_stats(train_logp, behaviour_logp, response_mask) -> dict:
    """Per-token |log pi/mu| statistics over the response tokens: mean, max, long-tail
    share (`long_tail`), mean on long-tail tokens and on the rest (nan if none),
    mean response length."""
    mask = response_mask.bool()
    diff = _abs_log_ratio(train_logp, behaviour_logp, mask)
    tail = long_tail(behaviour_logp[mask])
    n_tail = int(tail.sum())
    return {
        "mean_abs_log_ratio": diff.mean().item(),
        "max_abs_log_ratio": diff.max().item(),
        "long_tail_share": n_tail / diff.numel(),
        "long_tail_mean": diff[tail].mean().item() if n_tail else float("nan"),
        "rest_mean": diff[~tail].mean().item() if n_tail < diff.numel() else float("nan"),
        "response_length": mask.sum(-1).double().mean().item(),
        "tokens": diff.numel(),
    }


# Behaviour-probability bins of `mismatch_by_mu`: the long tail, then up to near-certain tokens.
MU_EDGES = (LONG_TAIL_MU, 0.1, 0.5, 0.9, 0.99)


def mismatch_by_mu(train_logp, behaviour_logp, response_mask, edges=MU_EDGES) -> list[dict]:
    """|log pi/mu| by the sampled token's behaviour probability mu, in the bins
    [0, e1], (e1, e2], ..., (ek, 1] (the first is the long tail, mu <= LONG_TAIL_MU): each
    bin's share of the response tokens and mean (nan if empty). Shows where a mean comes
    from: near-certain tokens carry almost none."""
    mask = response_mask.bool()
    diff = _abs_log_ratio(train_logp, behaviour_logp, mask)
    mu = behaviour_logp[mask].double().exp()
    bounds = (-math.inf, *edges, math.inf)
    rows = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = (mu > lo) & (mu <= hi)
        rows.append({"mu_from": max(lo, 0.0), "mu_to": min(hi, 1.0), "share": sel.double().mean().item(),
                     "mean_abs_log_ratio": diff[sel].mean().item() if bool(sel.any()) else float("nan")})
    return rows


def precision_mismatch(policy, prompts: list[list[int]], precision: str, *, eos_token_id: int, pad_token_id: int,
                       n_samples: int = 4, max_new_tokens: int = 24, temperature: float = 1.0, seed: int = 0,
                       num_threads: int | None = None, batch: int = 64) -> dict[str, float]:
    """`token_mismatch_stats` of one engine precision against the trainer's forward, and the
    sampling time. Prompts go through the engine `batch` at a time."""
    engine = make_engine(policy, precision, num_threads=num_threads)
    gen = torch.Generator().manual_seed(seed)
    train, behaviour, seconds = [], [], 0.0
    for s in range(0, len(prompts), batch):
        start = time.perf_counter()
        r = generate(engine, prompts[s : s + batch], n_samples=n_samples, max_new_tokens=max_new_tokens,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature, generator=gen)
        seconds += time.perf_counter() - start
        with torch.no_grad(), quantized_forward(policy, precision):  # a no-op but for fp8_e2e
            logp = sequence_logprobs(policy, r.input_ids, r.attention_mask, response_start=r.prompt_len,
                                     temperature=temperature)
        train.append(logp[r.response_mask])
        behaviour.append(r.behaviour_logp[r.response_mask])
    flat_train, flat_behaviour = torch.cat(train)[None], torch.cat(behaviour)[None]
    every_token = torch.ones_like(flat_train, dtype=torch.bool)  # already response tokens only
    stats = token_mismatch_stats(flat_train, flat_behaviour, every_token)
    stats["response_length"] = flat_train.shape[1] / (len(prompts) * n_samples)
    stats["by_mu"] = mismatch_by_mu(flat_train, flat_behaviour, every_token)
    return {**stats, "sample_seconds": seconds}


def _testbed(config: str, overrides: list[str], n_prompts: int):
    """(policy, tokenizer, prompts, rollout config) of a `drpo train` config: its warm-started
    policy (trained and cached on first use) and the first training prompts of its task."""
    from drpo.tasks import make_task
    from drpo.train.batching import encode_prompts
    from drpo.train.config import load_config
    from drpo.train.setup import load_model

    cfg = load_config(config, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = make_task(cfg.task, cfg.seed)
    policy, tokenizer, _ = load_model(cfg, task, torch.device("cpu"), log=lambda *a: None)
    examples = [task.train_example(i) for i in range(n_prompts)]
    prompts = encode_prompts(tokenizer, examples, cfg.task.prompt_template, system=cfg.model.system_prompt)
    return policy.eval(), tokenizer, prompts, cfg.rollout


def _precisions(text: str) -> list[str]:
    precisions = [x for x in text.split(",") if x]
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    return precisions


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("mismatch", help="measure the training-inference mismatch of each rollout precision",
                              description="Sample with an engine in each rollout precision, recompute the sampled "
                              "tokens' log-probs with the trainer's forward, and compare them.")
    p.add_argument("--config", default=None, help="a `drpo train` config (e.g. configs/testbed.yaml): its "
                   "warm-started policy, task prompts, n_samples, max_new_tokens and temperature")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config: a config override, as for drpo train (e.g. seed=1)")
    p.add_argument("--policy", default="tiny", help="without --config: 'tiny', 'smollm2' or a local HF directory")
    p.add_argument("--precisions", type=_precisions, default="fp32,bf16,fp8_e4m3,fp8_e5m2")
    p.add_argument("--prompts", type=int, default=64, help="with --config: number of training prompts")
    p.add_argument("--n-samples", type=int, default=None, help="default: the config's, else 4")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's, else 24")
    p.add_argument("--temperature", type=float, default=None, help="default: the config's, else 1.0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads while sampling")
    p.add_argument("--by-mu", action="store_true", help="also print the mismatch by the sampled tokens' "
                   "behaviour probability mu (share of tokens and mean |log pi/mu| per bin)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.set_defaults(run=run)
    return p


def _print_by_mu(rows: dict) -> None:
    print("mismatch by behaviour probability mu: share of tokens / mean |log pi/mu|")
    print(f"{'precision':<10} " + " ".join(f"{'mu %g-%g' % (b['mu_from'], b['mu_to']):>18}"
                                         for b in next(iter(rows.values()))["by_mu"]))
    for precision, m in rows.items():
        print(f"{precision:<10} " + " ".join(f"{b['share']:>8.3f} /{b['mean_abs_log_ratio']:>9.2e}"
                                             for b in m["by_mu"]))


def run(args: argparse.Namespace) -> int:
    if args.config:
        policy, tokenizer, prompts, ro = _testbed(args.config, args.set, args.prompts)
        source = f"config={args.config}" + "".join(f" --set {item}" for item in args.set)
        defaults = (ro.n_samples, ro.max_new_tokens, ro.temperature)
    else:
        policy, tokenizer = load_policy(args.policy, seed=args.seed)
        prompts = [encode_prompt(tokenizer, q) for q in DEFAULT_QUESTIONS]
        defaults, source = (4, 24, 1.0), f"policy={args.policy}"
    n_samples, max_new, temperature = (given if given is not None else d for given, d in
                                       zip((args.n_samples, args.max_new_tokens, args.temperature), defaults))
    print(f"{source} prompts={len(prompts)} n_samples={n_samples} max_new_tokens={max_new} "
          f"temperature={temperature} seed={args.seed} long tail: mu <= {LONG_TAIL_MU}")
    print(f"{'precision':<10} {'tail share':>10} {'resp len':>8} {'mean|log r|':>11} {'max|log r|':>10} "
          f"{'tail mean':>9} {'rest mean':>9} {'tail/rest':>9} {'tokens':>7} {'sample s':>8}")
    rows = {}
    for precision in tqdm(args.precisions, desc="precisions", file=sys.stderr):
        m = rows[precision] = precision_mismatch(
            policy, prompts, precision, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            n_samples=n_samples, max_new_tokens=max_new, temperature=temperature, seed=args.seed,
            num_threads=args.threads)
        ratio = m["long_tail_mean"] / m["rest_mean"] if m["rest_mean"] > 0 else float("nan")
        tqdm.write(f"{precision:<10} {m['long_tail_share']:>10.3f} {m['response_length']:>8.1f} "
                   f"{m['mean_abs_log_ratio']:>11.3e} {m['max_abs_log_ratio']:>10.3e} {m['long_tail_mean']:>9.3e} "
                   f"{m['rest_mean']:>9.3e} {ratio:>9.2f} {m['tokens']:>7d} {m['sample_seconds']:>8.2f}",
                   file=sys.stdout)
    if args.by_mu:
        _print_by_mu(rows)
    if args.json:
        table = {"source": source, "n_samples": n_samples, "max_new_tokens": max_new, "temperature": temperature,
                 "seed": args.seed, "precisions": rows}
        atomic_write(args.json, json.dumps(jsonable(table, nonfinite=str), indent=2), "mismatch")
    return 0
