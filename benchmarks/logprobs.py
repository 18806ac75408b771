"""Peak memory and time of token log-probs (forward + backward) at a real LM-head size:
drpo's chunked `token_logprobs` against the naive full-logits computation, TRL's
`ChunkedLogProbFunction` (what `trl.add_fused_lm_head` runs), and, for the loss-fused variant,
drpo's `fused_policy_loss("grpo")` against Liger-Kernel's `LigerFusedLinearGRPOLoss`. Two more
cases, in CUDA's default set and by `--cases` elsewhere: `torch.compile` of the naive
computation, and Liger's Triton kernel `LigerFusedLinearCrossEntropyLoss(reduction="none")`
(minus its per-token loss is the log-prob; CUDA only).

    .venv/bin/python benchmarks/logprobs.py                  # vocab 49,152, hidden 576, 8,192 tokens
    .venv/bin/python benchmarks/logprobs.py --tokens 1024    # quick
    python benchmarks/logprobs.py --device cuda --dtype bf16 --vocab 151936 --hidden 896 --tokens 32768

Each case runs in a fresh subprocess; its peak memory is the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the measured run) minus the resident
set at that moment (inputs built, libraries imported, a small warm-up done), so it counts
everything torch allocates, which tracemalloc cannot see. Time is the best of `--repeats`
rounds; rounds are interleaved across cases (round 1 of every case, then round 2, ...) so a
load change on a shared machine does not favour one case. Every case gets the same inputs
(seeded) and the same upstream gradient; a checksum column shows that the implementations
compute the same thing. On CUDA every case runs in this process instead: its peak memory is
torch.cuda.max_memory_allocated over the measured runs less what was allocated before them,
after a full-size warm-up (also what `compile` gets on the CPU, so that its compilation is not
timed). `--json FILE` also writes every figure. The last line is machine-readable:

    logprobs: memory_vs_naive=.. time_vs_naive=.. memory_vs_trl=.. time_vs_trl=.. memory_vs_liger=.. time_vs_liger=..

ratios ours/theirs (lower is better): `token_logprobs` for naive and TRL (all three return
log-probs), `fused_policy_loss("grpo", agg="seq-mean-token-mean")` for Liger (both return
the GRPO loss, which is Liger's "grpo" loss type).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

CASES = ("naive", "drpo", "trl", "liger", "drpo_fused")  # the default set: the summary line's
EXTRA_CASES = ("compile", "liger_ce")  # CUDA's default set adds these
CUDA_ONLY = ("liger_ce",)  # a Triton kernel
LABELS = {
    "naive": "naive log_softmax(h @ W.T / T).gather",
    "drpo": "drpo token_logprobs",
    "trl": "TRL ChunkedLogProbFunction",
    "liger": "Liger LigerFusedLinearGRPOLoss (grpo)",
    "drpo_fused": "drpo fused_policy_loss (grpo)",
    "compile": "torch.compile(naive)",
    "liger_ce": "Liger FusedLinearCrossEntropy (Triton)",
}
DTYPES = ("fp32", "bf16")  # of the hidden states and the LM head; log-probs are fp32 in every case
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, what add_fused_lm_head passes


def _inputs(args):
    """Seeded on the CPU (the same numbers on any device), then moved to --device and --dtype."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = args.tokens
    batch = max(1, n // args.seq_len)
    seq = n // batch
    hidden = torch.randn(batch, seq, args.hidden, generator=g)
    weight = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5
    targets = torch.randint(0, args.vocab, (batch, seq), generator=g)
    upstream = torch.randn(batch, seq, generator=g)
    advantages = torch.randn(batch, generator=g)
    old_logp = -torch.rand(batch, seq, generator=g) * 3 - 8  # plausible behaviour log-probs at V=49k
    mask = torch.ones(batch, seq, dtype=torch.bool)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), targets=targets, upstream=upstream,
             advantages=advantages, old_logp=old_logp, mask=mask)
    return {k: v.to(args.device) for k, v in x.items()}


def naive_logprobs(h, w, targets, temperature: float):
    import torch

    # Upcast the logits first (a no-op for fp32): what a careful user writes for bf16 models.
    return torch.log_softmax((h @ w.t()).float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _runner(case: str, args, x):
    """A closure running one forward + backward on fresh leaf copies; returns a checksum."""
    import torch

    t = args.temperature

    def leaves():
        # The same leaf tensors every run (built before the baseline), gradients cleared.
        h, w = x["hidden"].requires_grad_(True), x["weight"].requires_grad_(True)
        h.grad = w.grad = None
        return h, w

    def checksum(value, h, w):
        return float(value)  # the gradient norms are taken after the memory reading

    if case in ("naive", "compile"):
        fn = naive_logprobs if case == "naive" else torch.compile(naive_logprobs)

        def run():
            h, w = leaves()
            logp = fn(h, w, x["targets"], t)
            (logp * x["upstream"]).sum().backward()
            return checksum(logp.detach().sum(dtype=torch.float64), h, w)
    elif case == "drpo":
        from drpo.logprobs import token_logprobs

        def run():
            h, w = leaves()
            logp = token_logprobs(h, w, x["targets"], temperature=t, chunk_size=args.chunk_size)
            (logp * x["upstream"]).sum().backward()
            return checksum(logp.detach().sum(dtype=torch.float64), h, w)
    elif case == "trl":
        from trl.kernels import ChunkedLogProbFunction

        def run():
            h, w = leaves()
            hd = h.shape[-1]
            out = ChunkedLogProbFunction.apply(
                h.reshape(-1, hd), w, None, x["targets"].reshape(-1), t, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",)
            )
            logp = out[0].view_as(x["upstream"])
            (logp * x["upstream"]).sum().backward()
            return checksum(logp.detach().sum(dtype=torch.float64), h, w)
    elif case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", compiled=False,
                                           temperature=t)

        def run():
            h, w = leaves()
            loss = loss_fn(h, w, x["targets"], x["mask"].float(), x["advantages"], old_per_token_logps=x["old_logp"])[0]
            loss.backward()
            return checksum(loss.detach(), h, w)
    elif case == "liger_ce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        ce = LigerFusedLinearCrossEntropyLoss(reduction="none")  # per-token -log p, no temperature argument

        def run():
            h, w = leaves()
            hd = h.shape[-1]
            scaled = h if t == 1 else h / t
            logp = -ce(w, scaled.reshape(-1, hd), x["targets"].reshape(-1)).view_as(x["upstream"])
            (logp * x["upstream"]).sum().backward()
            return checksum(logp.detach().sum(dtype=torch.float64), h, w)
    elif case == "drpo_fused":
        from drpo.logprobs import fused_policy_loss

        def run():
            h, w = leaves()
            loss, _ = fused_policy_loss("grpo", h, w, x["targets"], x["old_logp"], x["advantages"], x["mask"],
                                        temperature=t, chunk_size=args.chunk_size, agg="seq-mean-token-mean",
                                        with_metrics=False)
            loss.backward()
            return checksum(loss.detach(), h, w)
    else:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES + EXTRA_CASES)}")
    return run


def measure(case: str, args) -> dict:
    """Runs inside the subprocess (on CUDA, in this process): warm-up, then the measured runs."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    x = _inputs(args)
    run = _runner(case, args, x)
    if cuda or case == "compile":
        run()  # at full size: compilation, Triton autotuning and cuBLAS plans are not timed
        x["hidden"].grad = x["weight"].grad = None  # so the baseline below holds no gradient
    else:  # a small slice: imports, kernels, thread pools, without raising the resident set
        small = argparse.Namespace(**{**vars(args), "tokens": min(args.tokens, 64), "seq_len": min(args.seq_len, 64)})
        _runner(case, small, _inputs(small))()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_kb = reset_peak_rss()
    times, check = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        check = run()  # float(): a host sync, so the time includes the device's work
        times.append(time.perf_counter() - start)
        gc.collect()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else (peak_rss() - base_kb) / 1024
    check = [check, float(x["hidden"].grad.double().norm()), float(x["weight"].grad.double().norm())]
    return {"case": case, "peak_mb": peak_mb, "time_s": min(times), "times": times, "check": check}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the resident-set high-water mark to the current RSS (Linux: write 5 to
    /proc/self/clear_refs) and return that RSS in KiB: the baseline is what is resident
    right now, not the highest point reached while building the inputs. Elsewhere, fall
    back to ru_maxrss (then the baseline is the earlier peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_case(case: str, args) -> dict:
    """One case's result, or {"case", "error"} where it failed (the other cases still run)."""
    if args.device == "cuda":
        import torch

        try:
            return measure(case, args)
        except Exception as err:  # e.g. out of memory at this size, or a kernel that does not build
            return {"case": case, "error": f"{type(err).__name__}: {str(err)[:500]}"}
        finally:
            gc.collect()
            torch.cuda.empty_cache()  # the next case starts from free memory
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case] + _forward_args(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward_args(args) -> list[str]:
    out = []
    for key in ("tokens", "vocab", "hidden", "seq_len", "chunk_size", "temperature", "repeats", "threads",
                "device", "dtype"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out


def _where(args) -> str:
    if args.device == "cuda":
        import torch

        return f"CUDA {torch.cuda.get_device_name()}"
    return f"CPU threads={args.threads or 'default'}"


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """The summary line's ratios, ours/theirs; NaN where either case failed or the baseline
    measured 0 (a peak below the RSS resolution at tiny sizes)."""
    def ratio(a, b, key):
        ok = "error" not in results[a] and "error" not in results[b] and results[b][key] > 0
        return results[a][key] / results[b][key] if ok else float("nan")

    return {
        "memory_vs_naive": ratio("drpo", "naive", "peak_mb"), "time_vs_naive": ratio("drpo", "naive", "time_s"),
        "memory_vs_trl": ratio("drpo", "trl", "peak_mb"), "time_vs_trl": ratio("drpo", "trl", "time_s"),
        "memory_vs_liger": ratio("drpo_fused", "liger", "peak_mb"),
        "time_vs_liger": ratio("drpo_fused", "liger", "time_s"),
    }


def report(results: dict[str, dict], args) -> list[str]:
    naive = results["naive"]
    lines = [
        f"token log-probs fwd+bwd: tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} "
        f"temperature={args.temperature} drpo chunk_size={args.chunk_size} {args.dtype} {_where(args)} "
        f"repeats={args.repeats}",
        f"{'case':<42} {'peak MB':>9} {'time s':>8} {'mem/naive':>10} {'time/naive':>11}  checksum (value, |grad_h|, |grad_W|)",
    ]
    for case, r in results.items():
        if "error" in r:
            lines.append(f"{LABELS[case]:<42} failed: {r['error'].strip().splitlines()[-1][:200]}")
            continue
        check = ", ".join(f"{v:.6g}" for v in r["check"])
        mem, tim = (r["peak_mb"] / naive["peak_mb"], r["time_s"] / naive["time_s"]) if "error" not in naive else (
            float("nan"), float("nan"))
        lines.append(f"{LABELS[case]:<42} {r['peak_mb']:>9.1f} {r['time_s']:>8.2f} {mem:>10.3f} {tim:>11.3f}  ({check})")

    lines.append("logprobs: " + " ".join(f"{k}={v:.3f}" for k, v in ratios(results).items()))
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (the loss cases need [B, S, H])")
    p.add_argument("--chunk-size", type=int, default=1024, help="drpo's token chunk")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="rounds (one fresh-process run per case each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="of the hidden states and the LM head")
    p.add_argument("--cases", help=f"comma-separated, from {', '.join(CASES + EXTRA_CASES)} (default: "
                   f"{', '.join(CASES)}; on CUDA all; the summary line needs the first five)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("tokens", "vocab", "hidden", "seq_len", "chunk_size", "repeats"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.temperature <= 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.cases is None:
        args.cases = ",".join(CASES + EXTRA_CASES if args.device == "cuda" else CASES)
    if args.device == "cuda" and args.case is None:
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA GPU on this machine")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.case, args)))
        return 0
    from tqdm import tqdm

    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES + EXTRA_CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {', '.join(CASES + EXTRA_CASES)}")
    if args.device != "cuda" and set(cases) & set(CUDA_ONLY):
        raise SystemExit(f"case(s) {sorted(set(cases) & set(CUDA_ONLY))} need --device cuda")
    # Rounds of one run per case, interleaved, so a change in the machine's load during the
    # benchmark hits every case alike; each case keeps its best time and its highest peak.
    rounds = args.repeats
    args.repeats = 1
    results: dict[str, dict] = {}
    # On CUDA one round of `repeats` runs per case, in this process (no load to interleave against).
    if args.device == "cuda":
        rounds, args.repeats = 1, rounds
    with tqdm(total=rounds * len(cases), desc="logprobs benchmark", unit="run") as bar:
        for _ in range(rounds):
            for case in cases:
                r = run_case(case, args)
                bar.update()
                tqdm.write(f"{case}: failed" if "error" in r else f"{case}: {r['peak_mb']:.1f} MB, {r['time_s']:.2f} s")
                prev = results.get(case)
                if prev is not None and "error" not in prev and "error" not in r:
                    r["times"] = prev["times"] + r["times"]
                    r["time_s"] = min(r["times"])
                    r["peak_mb"] = max(r["peak_mb"], prev["peak_mb"])
                if prev is None or "error" not in prev:
                    results[case] = r
    args.repeats = rounds * args.repeats
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: getattr(args, k) for k in ("tokens", "vocab", "hidden", "seq_len", "chunk_size",
                                                               "temperature", "repeats", "device", "dtype")},
                       "where": _where(args), "labels": {c: LABELS[c] for c in results}, "cases": results,
                       "ratios": ratios(results) if set(CASES) <= set(results) else None}, f, indent=1)
    if not set(CASES) <= set(cases):
        return 0
    for line in report(results, args):
        print(line)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
