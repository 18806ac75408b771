"""drpo's losses inside verl's real engine loop, on 1 and on 2 processes.

tests/integrations/verl/engine_worker.py (run by torchrun, gloo, CPU) builds verl 0.9.1's own
`FSDPEngineWithLMHead` (FSDP2, a tiny random Llama) and runs its `forward_backward_batch` with
verl's worker loss `ppo_loss` for every registered drpo loss mode and verl's vanilla, dppo_tv and
cispo, every `loss_agg_mode`, with and without `rollout_is_weights`, with dynamic batch size (2-4 micro-batches per rank). The only patches are the CPU device (see the worker's docstring:
`patch_verl_for_cpu`, which replaces `verl.utils.device.get_device_name`/`get_device_id` and the
CUDA memory log line `transformer_impl.log_gpu_memory_usage`).

Checked here, against references computed independently of the engine:
- every mode's accumulated, rank-averaged gradient equals the gradient of the whole mini-batch
  computed at once (one padded forward of a plain copy of the model, one loss call with local
  counts: drpo's `policy_loss`, or verl's own loss function for verl's modes);
- drpo `grpo` == verl `vanilla`, `drpo_dppo_tv` == `dppo_tv`, `drpo_dppo_kl` == `dppo_kl`,
  `drpo_cispo` == `cispo`: gradients and `actor/pg_loss` as verl aggregates it (verl writes its
  dppo losses as -A*sg(w)*log pi; the plugin reports that value, docs/integrations.md);
- what verl makes of the count metrics: `actor/drpo/tokens` is a mean over micro-batches and
  ranks, not a total (docs/integrations.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils.metric.utils import AggregationType, Metric

from drpo.integrations import verl as plugin
from drpo.objectives import policy_loss
from engine_worker import AGG_MODES, VERL_PAIRS, actor_config, response_logprobs

WORKER = Path(__file__).with_name("engine_worker.py")
# ~1 min per launch on 2 idle cores; DRPO_ENGINE_TIMEOUT_S raises it on a machine busy with other work
TIMEOUT_S = float(os.environ.get("DRPO_ENGINE_TIMEOUT_S", 600))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def engine_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"engine{request.param}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(request.param),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the verl engine job did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    setup = torch.load(out / "batch.pt")
    assert setup["world"] == request.param
    return setup, torch.load(out / "results.pt")


def _whole_batch_grad(model, batch, mode: str, agg: str, with_is: bool) -> torch.Tensor:
    """The gradient of the whole mini-batch in one loss call (local counts = global counts)."""
    model.zero_grad()
    logp = response_logprobs(model, batch)
    mask = batch["response_mask"]
    weights = batch["rollout_is_weights"] if with_is else None
    method = next((m for m, name in plugin.VERL_LOSS_NAMES.items() if name == mode), None)
    config = actor_config(mode, agg)
    if method is None:  # one of verl's own losses, with no global batch info: local normalisation
        loss, _ = get_policy_loss_fn(mode)(old_log_prob=batch["old_log_probs"], log_prob=logp,
                                           advantages=batch["advantages"], response_mask=mask.bool(),
                                           loss_agg_mode=agg, config=config, rollout_is_weights=weights)
    else:
        loss, _ = policy_loss(method, logp, batch["old_log_probs"], batch["advantages"], mask,
                              agg="token-mean" if agg == "token-sum" else agg,
                              normalizer=1.0 if agg == "token-sum" else None, token_weights=weights,
                              **plugin.method_params(method, config))
    loss.backward()
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest gradient error relative to the largest gradient entry."""
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def _metric(kind: str, values: list[float]) -> Metric:
    m = Metric(kind)
    m.extend(values)
    return m


def _aggregated(metrics: list[dict], key: str) -> float:
    """A metric as verl's TrainingWorker aggregates it over ranks and micro-batches."""
    return float(Metric.aggregate_dp([_metric(*rank[key]) for rank in metrics]))


@pytest.fixture(scope="module")
def plain_model(engine_run):
    from transformers import LlamaForCausalLM

    setup, _ = engine_run
    return LlamaForCausalLM.from_pretrained(setup["model"], attn_implementation="eager", dtype=torch.float32)


def test_every_mode_accumulates_to_the_whole_mini_batch_gradient(engine_run, plain_model):
    setup, results = engine_run
    modes = {mode for mode, *_ in results}
    assert set(plugin.VERL_LOSS_NAMES.values()) | set(VERL_PAIRS.values()) == modes
    assert len(results) == len(modes) * len(AGG_MODES) * 2
    worst = {}
    for (mode, agg, with_is), res in results.items():
        micro = {len(rank["actor/pg_loss"][1]) for rank in res["metrics"]}
        assert min(micro) >= 2, (mode, agg, micro)  # gradient accumulation really happens
        want = _whole_batch_grad(plain_model, setup["batch"], mode, agg, with_is)
        worst[(mode, agg, with_is)] = _close(res["grad"], want)
    bad = {k: v for k, v in worst.items() if v > 2e-5}
    assert not bad, bad


def test_drpo_losses_equal_verls_own_in_the_engine(engine_run):
    _, results = engine_run
    for ours, theirs in VERL_PAIRS.items():
        for agg in AGG_MODES:
            for with_is in (False, True):
                a, b = results[(ours, agg, with_is)], results[(theirs, agg, with_is)]
                case = (ours, theirs, agg, with_is)
                assert _close(a["grad"], b["grad"]) < 2e-6, case
                assert _aggregated(a["metrics"], "actor/pg_loss") == pytest.approx(
                    _aggregated(b["metrics"], "actor/pg_loss"), rel=1e-5, abs=1e-7), case
    # the IS weights reach the loss, and the clips act on this batch
    g = results[("grpo", "token-mean", True)]["grad"]
    assert _close(g, results[("grpo", "token-mean", False)]["grad"]) > 1e-3
    assert any(_aggregated(r["metrics"], "actor/pg_clipfrac") > 0 for k, r in results.items() if k[0] == "vanilla")


def test_count_metrics_are_means_over_micro_batches_and_ranks(engine_run):
    setup, results = engine_run
    total = int(setup["batch"]["response_mask"].sum())
    res = results[("drpo", "token-mean", False)]
    kind, _ = res["metrics"][0]["actor/drpo/tokens"]
    assert kind == AggregationType.MEAN.value  # ppo_loss wraps every loss metric as a mean
    per_call = [v for rank in res["metrics"] for v in rank["actor/drpo/tokens"][1]]
    assert sum(per_call) == total  # each loss call counts its own micro-batch
    n_micro = len(res["metrics"][0]["actor/drpo/tokens"][1])
    logged = _aggregated(res["metrics"], "actor/drpo/tokens")
    assert logged == pytest.approx(total / (n_micro * setup["world"]))  # what verl logs: not the total
    assert logged < total
