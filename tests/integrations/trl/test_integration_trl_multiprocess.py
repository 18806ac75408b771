"""DRPOGRPOTrainer against TRL's own GRPOTrainer in a real 2-process job.

torchrun starts 2 CPU processes (gloo, `use_cpu=True`); each trains, one after another, TRL's
`GRPOTrainer` and `DRPOGRPOTrainer(drpo_method="grpo")` from the same tiny model, data and seed
(tests/integrations/trl/trl_multiprocess_worker.py: 4 optimizer steps, gradient accumulation 2, num_iterations 2)
for loss_type dapo and bnpo, then DRPOGRPOTrainer(drpo_method="drpo"). The reference is TRL's own
run: per-step loss, grad norm, entropy and final weights must be equal. In one process the
`/ num_processes` of dapo's normaliser is 1, so only a job like this one can see it wrong.
For drpo, each `drpo/*` value TRL logs must be the cross-process reduction TRL applies to its own
metrics (docs/integrations.md), averaged over the step's loss calls as TRL's `log` averages.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from drpo.objectives import METRIC_NAMES  # noqa: E402

WORKER = Path(__file__).with_name("trl_multiprocess_worker.py")
PROCESSES = 2
STEPS = 4
CALLS_PER_STEP = 2  # gradient_accumulation_steps: one loss call per micro-batch
RUNS = ("trl:dapo", "drpo-grpo:dapo", "trl:bnpo", "drpo-grpo:bnpo", "drpo:dapo")
TIMEOUT_S = 300  # the 5 runs take ~20 s on 2 idle cores

# What TRL does with its own metrics over processes (trl 1.16 GRPOTrainer): `num_tokens` and the
# tool-call counts are gathered sums, `.../min` and `.../max` gathered nanmin/nanmax, means a
# gathered nanmean (`policy_loss`, `aux_loss`). The drpo keys by kind:
SUMMED = {"tokens", "nonfinite_tokens"}
MINIMUM = {"ratio_min", "weight_min"}
MAXIMUM = {"ratio_max", "tv_max", "weight_max"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trl2p")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(PROCESSES),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out), *RUNS]
    tests = str(Path(__file__).parents[2])  # the worker imports trl_helpers from tests/
    pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), tests) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", PYTHONPATH=pythonpath)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        log, _ = proc.communicate()
        pytest.fail(f"the 2-process TRL job did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    return out


def _run(job: Path, tag: str) -> tuple[int, list[dict], dict]:
    info = json.loads((job / f"{tag}.json").read_text())
    steps = [e for e in info["log_history"] if "grad_norm" in e]
    return info["num_processes"], steps, torch.load(job / f"{tag}.weights.pt")


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_two_processes_equal_trls_own_grpo_trainer(job, loss_type):
    n_ref, ref, ref_weights = _run(job, f"trl-{loss_type}")
    n_got, got, got_weights = _run(job, f"drpo-grpo-{loss_type}")
    assert n_ref == n_got == PROCESSES  # really 2 processes, not one that ignored the launcher
    assert [e["step"] for e in ref] == [e["step"] for e in got] == list(range(1, STEPS + 1))
    # num_iterations 2: the second pass over each generation batch has ratio != 1 and clips.
    assert max(e["clip_ratio/region_mean"] for e in ref) > 0
    for r, g in zip(ref, got):
        for key in ("loss", "grad_norm", "entropy", "reward", "num_tokens"):
            if key not in r:  # reward, num_tokens: logged at the steps that generate
                continue
            assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (loss_type, r["step"], key)
    assert ref_weights.keys() == got_weights.keys()
    moved = max(float((ref_weights[k] - w0).abs().max()) for k, w0 in _run(job, "drpo-dapo")[2].items())
    assert moved > 0  # the runs train (drpo ends elsewhere)
    for k, w in ref_weights.items():
        torch.testing.assert_close(got_weights[k], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{loss_type} {k}: {m}")


def _reduce(key: str, values: list[float]) -> float:
    base = key.removeprefix("drpo/")
    if base in SUMMED:
        return sum(values)
    if base in MINIMUM:
        return min(values)
    if base in MAXIMUM:
        return max(values)
    return sum(values) / len(values)


@pytest.mark.slow
def test_drpo_metrics_are_trls_cross_process_reductions(job):
    n, steps, _ = _run(job, "drpo-dapo")
    assert n == PROCESSES
    local = [json.loads((job / f"drpo-dapo.rank{r}.local.json").read_text()) for r in range(PROCESSES)]
    assert all(len(calls) == STEPS * CALLS_PER_STEP for calls in local)
    keys = [f"drpo/{k}" for k in (*METRIC_NAMES, "loss")] + ["drpo/anchor_is_rollout", "drpo/anchor_fallback_frac"]
    assert set(keys) <= set(local[0][0]) and SUMMED | MINIMUM | MAXIMUM <= set(METRIC_NAMES)
    for key in ("drpo/tokens", "drpo/ratio_max", "drpo/ratio_min", "drpo/abs_log_ratio"):  # ranks differ
        assert any(local[0][c][key] != local[1][c][key] for c in range(len(local[0]))), key
    for s, logged in enumerate(steps):
        calls = range(s * CALLS_PER_STEP, (s + 1) * CALLS_PER_STEP)
        for key in keys:
            want = sum(_reduce(key, [rank[c][key] for rank in local]) for c in calls) / len(calls)
            assert logged[key] == pytest.approx(want, rel=1e-9, abs=1e-12), (s + 1, key)
        # TRL's own entropy: the token-weighted mean over processes.
        want = sum(sum(r[c]["entropy_sum"] for r in local) / sum(r[c]["entropy_count"] for r in local)
                   for c in calls) / len(calls)
        assert logged["entropy"] == pytest.approx(want, rel=1e-6)  # fp32 sums
    assert max(e["drpo/regularizer"] for e in steps) > 0 and not any(math.isnan(e["drpo/loss"]) for e in steps)
