"""The logprobs benchmark's cases compute the same thing (small sizes, in-process), and its
summary line has the promised format."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "logprobs.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_logprobs", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cases_agree_and_summary_line(bench):
    args = bench.parse_args(["--tokens", "96", "--vocab", "300", "--hidden", "16", "--seq-len", "32",
                             "--chunk-size", "40", "--temperature", "0.8", "--repeats", "1"])
    results = {case: bench.measure(case, args) for case in bench.CASES}
    for case, r in results.items():
        assert r["peak_mb"] >= 0 and r["time_s"] > 0, case
    # naive, drpo and TRL return the same log-probs and gradients; Liger and drpo's fused
    # loss the same GRPO loss and gradients.
    for case in ("drpo", "trl"):
        assert results[case]["check"] == pytest.approx(results["naive"]["check"], rel=1e-5), case
    assert results["drpo_fused"]["check"] == pytest.approx(results["liger"]["check"], rel=1e-5)
    for r in results.values():  # avoid zero division in the ratios at this tiny size
        r["peak_mb"] = max(r["peak_mb"], 1e-3)
    last = bench.report(results, args)[-1]
    keys = ["memory_vs_naive", "time_vs_naive", "memory_vs_trl", "time_vs_trl", "memory_vs_liger", "time_vs_liger"]
    assert re.fullmatch("logprobs: " + " ".join(f"{k}=[0-9.]+" for k in keys), last), last


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--temperature", "-1"])
