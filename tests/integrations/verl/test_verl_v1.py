"""verl 0.9.1's default trainer (`trainer.use_v1=true`, verl/trainer/ppo/v1/) with the plugin.

- The v1 trainer imports in this venv (TransferQueue at the version verl's "verl-core" extra asks for).
- The driver dump, with v1's own advantage function and data layout: `_compute_advantage`
  fetches uid, response_mask, rm_scores and log-probs from TransferQueue (no `responses`),
  pads them into a DataProto and calls `compute_advantage_for_multi_trajectories`; the dump of
  what that returns is read by `drpo inspect`.
- Bypass mode: the driver refuses, in verl's own `validate_config`, a drpo loss with
  `rollout_rs` the actor's policy_loss does not carry.
"""

from __future__ import annotations

import importlib.metadata as md
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from packaging.requirements import Requirement
from tensordict import TensorDict
from verl import DataProto

from drpo.integrations import verl as plugin
from inspect_reference import compare, reference
from test_verl_callsite import _compose
from test_verl_dump import _inspect

G = 4


def test_v1_trainer_imports_with_the_transferqueue_verl_asks_for():
    wanted = [Requirement(r) for r in md.requires("verl") if r.startswith("TransferQueue")]
    assert wanted, "verl 0.9.1 declares TransferQueue in its verl-core extra"
    assert all(r.specifier.contains(md.version("TransferQueue")) for r in wanted)
    from verl.trainer.ppo.v1 import get_trainer_cls, trainer_base  # noqa: F401

    assert _compose(()).trainer.use_v1 is True  # the default trainer is the one imported here


def _v1_batch(n=8, T=7):
    """What v1's `_compute_advantage` builds before advantages: TransferQueue's nested fields
    (uid, response_mask, rm_scores, rollout/old log-probs) padded into a DataProto, the uid moved
    to non_tensor_batch, rewards = scores; and the keys `{uid}_{session}_{index}` it passes."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(2, T + 1, (n,), generator=g).tolist()
    rollout = [-torch.rand(k, generator=g) * 4 for k in lengths]
    fields = {
        "response_mask": [torch.ones(k) for k in lengths],
        "rm_scores": [torch.cat([torch.zeros(k - 1), torch.randint(0, 2, (1,), generator=g).float()]) for k in lengths],
        "rollout_log_probs": rollout,
        "old_log_probs": [r + torch.randn(r.shape, generator=g) * 0.05 for r in rollout],
    }
    nested = TensorDict({k: torch.nested.nested_tensor(v, layout=torch.jagged) for k, v in fields.items()}, batch_size=n)
    data = DataProto(batch=nested.to_padded_tensor())
    data.batch["token_level_scores"] = data.batch["rm_scores"]
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    uids = [f"prompt{i // G}" for i in range(n)]
    data.non_tensor_batch["uid"] = np.array(uids, dtype=object)
    return data, [f"{u}_0_0" for u in uids]  # one session per trajectory, as single-turn rollouts give


def test_v1_driver_dump_with_v1s_advantage_step(tmp_path, monkeypatch):
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.v1 import trainer_base

    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)  # restored after
    monkeypatch.setattr(trainer_base, "compute_advantage_for_multi_trajectories",
                        trainer_base.compute_advantage_for_multi_trajectories)
    plugin.install_driver_dump(str(tmp_path / "dumps"), every=1)
    data, keys = _v1_batch()
    algorithm = _compose(()).algorithm
    # as trainer_base._compute_advantage calls it (the name it looks up in its own module)
    out = trainer_base.compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator="grpo", gamma=algorithm.gamma, lam=algorithm.lam, num_repeat=G,
        norm_adv_by_std_in_grpo=True, config=algorithm)
    (f,) = sorted((tmp_path / "dumps").glob("*.parquet"))
    rows = pq.read_table(f).to_pylist()
    assert [r["group_id"] for r in rows] == [i // G for i in range(len(data))] and {r["step"] for r in rows} == {1}
    assert all(r["token_ids"] is None for r in rows)  # v1's advantage step holds no response ids
    for i, r in enumerate(rows):
        m = out.batch["response_mask"][i].bool().numpy()
        np.testing.assert_array_equal(np.array(r["advantage"])[m], out.batch["advantages"][i].numpy()[m])
        np.testing.assert_array_equal(np.array(r["logp_rollout"])[m], data.batch["rollout_log_probs"][i].numpy()[m])
    assert np.abs(out.batch["advantages"].numpy()).max() > 0
    report = _inspect([f], tmp_path / "r")
    assert report["anchor"] == ["rollout"] and report["policy"] == ["before"]
    assert compare(report, reference([f], params=["drpo.delta=0.05,12.5"], policy="before")) > 100
    assert json.loads(pq.read_schema(f).metadata[b"drpo.dump"])["source"] == "verl_driver"


VALID = ("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",  # what verl's own validation asks for
         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2")
RS = ("actor_rollout_ref.actor.policy_loss.loss_mode=drpo", "algorithm.rollout_correction.bypass_mode=True",
      "algorithm.rollout_correction.rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs_threshold='0.7_1.4'")
CARRY = "+actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}"


def test_driver_refuses_bypass_rejection_the_drpo_loss_would_not_see():
    import verl.trainer.main_ppo as main_ppo
    from verl.utils.config import validate_config

    assert main_ppo.validate_config is validate_config and validate_config.drpo_check  # the driver's check
    with pytest.raises(ValueError, match=r"policy_loss.rollout_correction does not carry them.*rollout_rs=null"):
        validate_config(_compose((*VALID, *RS)), use_reference_policy=False, use_critic=False)
    validate_config(_compose((*VALID, *RS, CARRY)), use_reference_policy=False, use_critic=False)
    # verl's own losses, and drpo without rollout_rs, are left alone
    assert plugin.bypass_rollout_rs_problem(_compose((RS[0], RS[1]))) is None
    assert plugin.bypass_rollout_rs_problem(_compose(("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                                                       *RS[1:]))) is None
    assert plugin.bypass_rollout_rs_problem(_compose(RS)) is not None
