"""Rollout dumps from verl for `drpo inspect`: the worker-side dump inside our loss, driven
through verl's own `ppo_loss` call site, and the driver-side dump after verl's own
`compute_advantage`; each read by `drpo inspect`, whose numbers equal the independent float64
reference (tests/inspect_reference.py) on the same tensors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
from verl.workers.utils.losses import ppo_loss

from drpo.cli import main
from drpo.dumps import DumpWriter
from drpo.integrations import verl as plugin
from inspect_reference import compare, reference
from test_verl_callsite import _padded, _sequences, _verl_data, verl_actor


def _inspect(files, out):
    assert main(["inspect", *map(str, files), "--out", str(out), "--param", "drpo.delta=0.05,12.5"]) == 0
    return json.loads((out / "report.json").read_text())


def test_dump_inside_the_loss_through_verls_ppo_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(plugin, "_LOSS_DUMPS", {})
    actor = verl_actor(
        "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=drpo",
        f"+actor_rollout_ref.actor.policy_loss.drpo_dump={{dir:{tmp_path / 'dumps'},every:2}}",
    )
    seen = []
    for seed in range(4):  # four loss calls: the 2nd and the 4th are dumped
        flat, rows = _sequences(seed=seed)
        data = _verl_data(flat, rows, "no_padding", 1, None, None)
        x = flat.clone().requires_grad_(True)
        loss, _ = ppo_loss(actor, {"log_probs": x}, data)
        loss.backward()  # the dump leaves training untouched
        seen.append((_padded(flat, rows, "logp"), _padded(flat, rows, "old"), _padded(flat, rows, "adv"),
                     _padded(flat, rows, "mask") > 0))
    files = sorted((tmp_path / "dumps").glob("*.parquet"))
    assert len(files) == 2
    for f, call in zip(files, (2, 4)):
        rows = pq.read_table(f).to_pylist()
        logp, old, adv, mask = seen[call - 1]
        assert {r["step"] for r in rows} == {call}
        for i, r in enumerate(rows):
            m = mask[i]
            assert r["response_mask"] == m.tolist()
            np.testing.assert_allclose(np.array(r["logp_after"])[m.numpy()], logp[i][m].float().numpy(), rtol=0, atol=0)
            np.testing.assert_allclose(np.array(r["logp_before"])[m.numpy()], old[i][m].float().numpy(), rtol=0, atol=0)
            np.testing.assert_allclose(np.array(r["advantage"])[m.numpy()], adv[i][m].float().numpy(), rtol=0, atol=0)
    meta = json.loads(pq.read_schema(files[0]).metadata[b"drpo.dump"])
    assert meta["source"] == "verl_loss" and meta["method"] == "drpo"
    report = _inspect(files, tmp_path / "r")
    assert report["policy"] == ["after"] and report["anchor"] == ["before"]
    assert compare(report, reference(files, params=["drpo.delta=0.05,12.5"])) > 500
    assert report["total"]["methods"]["drpo(delta=0.05)"]["all"]["corrective_frac"] > 0  # the ratios are far off


def test_bad_dump_settings_are_refused():
    actor = verl_actor(
        "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=drpo",
        "+actor_rollout_ref.actor.policy_loss.drpo_dump={dir:x,every:0}",
    )
    flat, rows = _sequences(seed=0)
    with pytest.raises(ValueError, match="drpo_dump must be"):
        ppo_loss(actor, {"log_probs": flat.clone()}, _verl_data(flat, rows, "no_padding", 1, None, None))


def _driver_batch(n=8, T=7, G=4):
    """A batch as verl's driver holds it before advantages: responses, mask, old and rollout
    log-probs, outcome rewards, uids (G responses per prompt)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    rollout = -torch.rand(n, T, generator=g) * 4
    old = rollout + torch.randn(n, T, generator=g) * 0.05
    scores = torch.zeros(n, T)
    scores[torch.arange(n), lengths - 1] = torch.randint(0, 2, (n,), generator=g).float()
    uid = np.array([f"prompt-{i // G}" for i in range(n)], dtype=object)
    return DataProto.from_dict(
        tensors={"responses": torch.randint(0, 100, (n, T), generator=g), "response_mask": mask,
                 "old_log_probs": old, "rollout_log_probs": rollout, "token_level_rewards": scores},
        non_tensors={"uid": uid}, meta_info={"global_steps": 5},
    )


def _check_driver_dump(f, data, G, tmp_path):
    rows = pq.read_table(f).to_pylist()
    n = len(data)
    assert [r["step"] for r in rows] == [5] * n and [r["group_id"] for r in rows] == [i // G for i in range(n)]
    for i, r in enumerate(rows):
        m = data.batch["response_mask"][i].bool()
        np.testing.assert_array_equal(np.array(r["advantage"])[m.numpy()], data.batch["advantages"][i][m].float().numpy())
        assert r["token_ids"] == data.batch["responses"][i].tolist()
    report = _inspect([f], tmp_path / "r")
    assert report["anchor"] == ["rollout"] and report["policy"] == ["before"]
    assert compare(report, reference([f], params=["drpo.delta=0.05,12.5"])) > 500
    assert report["total"]["mismatch"]["all"]["mean_abs_log_ratio"] > 0


def test_driver_dump_of_a_batch_with_verls_grpo_advantages(tmp_path):
    data = _driver_batch()
    adv, _ = compute_grpo_outcome_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                            data.non_tensor_batch["uid"])
    data.batch["advantages"] = adv
    plugin.dump_verl_batch(DumpWriter(tmp_path / "dumps", metadata={"source": "verl_driver"}), data, 5)
    (f,) = sorted((tmp_path / "dumps").glob("*.parquet"))
    _check_driver_dump(f, data, 4, tmp_path)


def test_driver_hook_wraps_verls_compute_advantage(tmp_path, monkeypatch):
    pytest.importorskip("cachetools", reason="verl 0.9.1's ray_trainer imports cachetools, which verl does not declare")
    from verl.trainer.ppo import ray_trainer

    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)  # restored after
    try:  # the v1 trainer needs verl's "verl-core" extra (TransferQueue)
        from verl.trainer.ppo.v1 import utils as v1_utils

        monkeypatch.setattr(v1_utils, "compute_advantage", v1_utils.compute_advantage)
    except ImportError:
        pass
    plugin.install_driver_dump(str(tmp_path / "dumps"), every=1)
    out = ray_trainer.compute_advantage(_driver_batch(), adv_estimator="grpo", num_repeat=4)  # as the driver calls it
    (f,) = sorted((tmp_path / "dumps").glob("*.parquet"))
    _check_driver_dump(f, out, 4, tmp_path)
