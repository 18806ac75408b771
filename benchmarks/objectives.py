"""Loss + backward time and peak memory of every method over a large token batch, as ratios to
`grpo` measured in the same run.

    .venv/bin/python benchmarks/objectives.py [--tokens 1048576] [--repeats 5] [--device cuda] [--dtype fp32]

Each call is `policy_loss` with its diagnostics (one host transfer per call). Peak memory on
the CPU is the high-water mark of torch's CPU allocations during one loss+backward, measured
with torch.profiler's memory profiler (allocations only, not the interpreter); on CUDA it is
torch.cuda.max_memory_allocated over the call, less what was allocated before it. On CUDA the
inputs are bf16 by default (computed in fp32, as in a real run; `--dtype fp32` for fp32 inputs),
timings end with a synchronize, and the host syncs of one call are counted with torch's CUDA
sync debug mode (each synchronizing operation warns once). `--json FILE` also writes the table.
Last line: `objectives: drpo_time_vs_grpo=<x> drpo_memory_vs_grpo=<y>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's own logging out of the table

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from drpo.objectives import METHODS, policy_loss  # noqa: E402


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_batch(tokens: int, seq: int, seed: int = 0, device: str = "cpu", dtype: torch.dtype | None = None):
    """Inputs of `tokens // seq` rows of `seq` tokens; dtype defaults to bf16 on CUDA, fp32 on CPU."""
    g = torch.Generator().manual_seed(seed)
    batch = tokens // seq
    old = -torch.rand(batch, seq, generator=g) * 4
    logp = (old + torch.randn(batch, seq, generator=g) * 0.2).clamp(max=0)
    adv = torch.randn(batch, generator=g)
    mask = torch.rand(batch, seq, generator=g) < 0.9
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return logp.to(device, dtype), old.to(device, dtype), adv.to(device, dtype), mask.to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(method: str, logp, old, adv, mask, validate: bool):
    x = logp.detach().requires_grad_(True)
    loss, metrics = policy_loss(method, x, old, adv, mask, validate=validate)
    loss.backward()
    return x.grad


def time_methods(methods, batch, repeats, validate, device) -> dict[str, float]:
    """Median wall time per method; methods interleaved round by round so load spikes on a
    shared machine hit all of them alike."""
    for m in methods:
        step(m, *batch, validate)  # warm-up
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            _sync(device)
            t0 = time.perf_counter()
            step(m, *batch, validate)
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def peak_memory(method, batch, validate, device) -> int:
    """Peak bytes of live torch allocations during one loss + backward."""
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(method, *batch, validate)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        step(method, *batch, validate)
    # Replay allocation events in time order to find the high-water mark.
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def host_syncs(method, batch, validate) -> int:
    """Synchronizing CUDA operations in one loss + backward: the sync debug mode warns at each."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(method, *batch, validate)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-validate", action="store_true", help="skip input validation (as a hot training loop may)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU on this machine")
    if args.tokens < args.seq:
        raise SystemExit(f"--tokens ({args.tokens}) must be at least --seq ({args.seq})")
    torch.manual_seed(0)
    batch = make_batch(args.tokens, args.seq, device=args.device, dtype=DTYPES.get(args.dtype))
    validate = not args.no_validate
    methods = [m for m in ("grpo", "pg_is", "cispo", "spo", "dppo_tv", "dppo_kl", "drpo", "mask_drpo") if m in METHODS]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"loss+backward over {batch[0].numel():,} tokens ({batch[0].dtype}, {where}), "
          f"median of {args.repeats}; validate={validate}")
    times = time_methods(methods, batch, args.repeats, validate, args.device)
    results = {}
    for m in methods:
        syncs = host_syncs(m, batch, validate) if args.device == "cuda" else None  # none to count on the CPU
        results[m] = (times[m], peak_memory(m, batch, validate, args.device), syncs)
        print(f"  measured {m:<10} {times[m] * 1e3:8.1f} ms  {results[m][1] / 2**20:8.1f} MiB", flush=True)
    t_ref, m_ref, _ = results["grpo"]
    print(f"\n{'method':<10} {'time ms':>9} {'peak MiB':>9} {'time/grpo':>10} {'mem/grpo':>9} {'host syncs':>10}")
    for m, (t, mem, syncs) in results.items():
        print(f"{m:<10} {t * 1e3:9.1f} {mem / 2**20:9.1f} {t / t_ref:10.2f} {mem / m_ref:9.2f} "
              f"{'n/a' if syncs is None else syncs:>10}")
    t, mem, _ = results["drpo"]
    if args.json:
        table = {m: {"time_ms": t * 1e3, "peak_mib": mem / 2**20, "time_vs_grpo": t / t_ref,
                     "memory_vs_grpo": mem / m_ref, "host_syncs_per_call": syncs}
                 for m, (t, mem, syncs) in results.items()}
        info = {"tokens": batch[0].numel(), "dtype": str(batch[0].dtype).removeprefix("torch."), "device": where,
                "repeats": args.repeats, "validate": validate, "methods": table}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    print(f"objectives: drpo_time_vs_grpo={t / t_ref:.3f} drpo_memory_vs_grpo={mem / m_ref:.3f}")


if __name__ == "__main__":
    main()
