"""Rollout dumps from TRL's GRPOTrainer (DRPOGRPOTrainer, tiny random Llama on CPU): the rows
are the batches TRL's `_generate_and_score_completions` returned as our `_compute_loss` saw
them, and `drpo inspect` on them equals the independent float64 reference."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("trl")
from drpo.cli import main  # noqa: E402
from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer  # noqa: E402
from inspect_reference import compare, reference  # noqa: E402
from trl_helpers import tiny_trainer  # noqa: E402


class Capturing(DRPOGRPOTrainer):
    """Keeps what TRL handed each loss call, to check the dump against."""

    def _compute_loss(self, model, inputs):
        self.seen.append({k: inputs[k].detach().clone() for k in
                          ("completion_ids", "completion_mask", "advantages", "old_per_token_logps", "drpo_dump_index")})
        return super()._compute_loss(model, inputs)


def test_trl_dump_rows_and_inspect_against_the_reference(tmp_path):
    trainer = tiny_trainer(tmp_path, Capturing, drpo_dump_dir=str(tmp_path / "dumps"), drpo_dump_every=1)
    trainer.seen = []
    trainer.train()
    (f,) = sorted((tmp_path / "dumps").glob("*.parquet"))
    rows = pq.read_table(f).to_pylist()
    meta = json.loads(pq.read_schema(f).metadata[b"drpo.dump"])
    assert meta["source"] == "trl" and meta["method"] == "drpo" and meta["sampling"]["num_generations"] == 4
    seen = [(s, i) for s in trainer.seen for i in range(len(s["advantages"]))]
    assert len(rows) == len(seen) == 8
    assert sorted({r["step"] for r in rows}) == [0, 1]
    for r, (s, i) in zip(rows, seen):
        m = s["completion_mask"][i].bool().numpy()
        assert r["response_mask"] == m.tolist()
        assert r["token_ids"] == s["completion_ids"][i].tolist()
        assert r["sample_id"] == int(s["drpo_dump_index"][i]) and r["group_id"] == r["sample_id"] // 4
        np.testing.assert_array_equal(np.array(r["advantage"])[m], np.full(m.sum(), float(s["advantages"][i]), np.float32))
        np.testing.assert_array_equal(np.array(r["logp_before"])[m], s["old_per_token_logps"][i][m].float().numpy())
        assert r["logp_after"] is not None and r["entropy"] is not None and r["logp_rollout"] is None
    assert main(["inspect", str(f), "--out", str(tmp_path / "r"), "--param", "drpo.delta=0.05,12.5"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["policy"] == ["after"] and report["anchor"] == ["before"]
    assert compare(report, reference([f], params=["drpo.delta=0.05,12.5"])) > 500


def test_dump_every_is_checked(tmp_path):
    with pytest.raises(ValueError, match="drpo_dump_every"):
        DRPOConfig(output_dir=str(tmp_path), drpo_dump_dir="x", drpo_dump_every=0, report_to=[], use_cpu=True)
