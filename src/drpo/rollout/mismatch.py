"""Training-inference mismatch of each rollout precision: sample with an engine in that
precision, recompute the sampled tokens' log-probs with the fp32 policy, and compare.

    .venv/bin/python -m drpo.rollout.mismatch --policy tiny
    .venv/bin/python -m drpo.rollout.mismatch --policy smollm2 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from drpo.logprobs import sequence_logprobs
from drpo.models import PRECISIONS, encode_prompt, load_policy
from drpo.rollout.engine import generate, make_engine

DEFAULT_QUESTIONS = ("What is 17+25?", "What is 3*4?", "Compute 120-45.", "What is 9+10?")


def precision_mismatch(policy, prompts: list[list[int]], precision: str, *, eos_token_id: int, pad_token_id: int,
                       n_samples: int = 4, max_new_tokens: int = 24, temperature: float = 1.0, seed: int = 0,
                       num_threads: int | None = None) -> dict[str, float]:
    """Mean and max |behaviour logp - fp32 recomputation| over response tokens, the number
    of tokens, and the sampling time, for one engine precision."""
    engine = make_engine(policy, precision, num_threads=num_threads)
    start = time.perf_counter()
    r = generate(engine, prompts, n_samples=n_samples, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id, temperature=temperature,
                 generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logp = sequence_logprobs(policy, r.input_ids, r.attention_mask, response_start=r.prompt_len,
                                 temperature=temperature)
    diff = (logp - r.behaviour_logp)[r.response_mask].abs()
    return {"mean_abs_log_ratio": diff.mean().item(), "max_abs_log_ratio": diff.max().item(),
            "tokens": int(r.response_mask.sum()), "sample_seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="tiny", help="'tiny', 'smollm2' or a local HF directory")
    p.add_argument("--precisions", default="fp32,bf16,fp8_e4m3,fp8_e5m2")
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads while sampling")
    args = p.parse_args(argv)
    precisions = [x for x in args.precisions.split(",") if x]
    unknown = [x for x in precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    policy, tokenizer = load_policy(args.policy, seed=args.seed)
    prompts = [encode_prompt(tokenizer, q) for q in DEFAULT_QUESTIONS]
    print(f"policy={args.policy} prompts={len(prompts)} n_samples={args.n_samples} "
          f"max_new_tokens={args.max_new_tokens} temperature={args.temperature} seed={args.seed}")
    print(f"{'precision':<10} {'mean|log r|':>12} {'max|log r|':>11} {'tokens':>7} {'sample s':>9}")
    for precision in tqdm(precisions, desc="precisions", file=sys.stderr):
        m = precision_mismatch(policy, prompts, precision, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, n_samples=args.n_samples,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                               num_threads=args.threads)
        tqdm.write(f"{precision:<10} {m['mean_abs_log_ratio']:>12.3e} {m['max_abs_log_ratio']:>11.3e} "
                   f"{m['tokens']:>7d} {m['sample_seconds']:>9.2f}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
