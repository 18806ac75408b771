"""`drpo inspect`: its numbers against an independent float64 recomputation (tests/inspect_reference.py:
plain pyarrow reads, closed-form weights and boundaries), on dumps written by drpo's writer and by
`drpo train`; streaming; the sanity header's offset flag; bad dumps named by file, row and column."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from drpo.cli import main
from drpo.dumps import META_KEY, DumpError, DumpWriter, iter_tokens
from drpo.inspect.analysis import BUCKETS, analyze, bucket_of, make_variants
from inspect_reference import compare, reference
from train_helpers import fast_args

PARAMS = ["drpo.delta=0.05,0.15,1,12.5", "grpo.dual_clip=3"]
SWEEP = [arg for p in PARAMS for arg in ("--param", p)]


def synthetic_batch(rng: np.random.Generator, n: int = 24, seq: int = 12):
    """Behaviour probabilities over 1e-4..1 and shifts in every direction and size, so every
    weight category and bucket occurs; ragged response masks; per-sequence advantages."""
    mu = np.exp(rng.uniform(np.log(1e-4), 0, (n, seq)))
    d = rng.choice([-1, 1], (n, seq)) * rng.uniform(0, 1, (n, seq)) ** 3 * np.where(rng.random((n, seq)) < 0.5, mu, 1)
    pi = np.clip(mu + d, 1e-6, 1 - 1e-6)
    before = np.log(np.clip(mu * np.exp(rng.normal(0, 0.02, (n, seq))), 1e-8, 1 - 1e-7))
    mask = np.arange(seq)[None, :] < rng.integers(1, seq + 1, (n, 1))
    adv = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], (n, 1))
    rollout = np.log(mu)
    rollout[0, 0] = np.nan  # the engine could not score this token: anchored on logp_before
    return dict(response_mask=mask, logp_rollout=rollout, logp_before=before, logp_after=np.log(pi),
                advantage=adv, token_ids=rng.integers(0, 50, (n, seq)), group_id=np.arange(n) // 4)


def write_synthetic(directory, steps=(1, 2), seed=0, method="drpo"):
    rng = np.random.default_rng(seed)
    w = DumpWriter(directory, metadata={"source": "test", "method": method, "model": "synthetic"})
    for s in steps:
        w.write(step=s, **synthetic_batch(rng))
    w.close()
    return w.path


def run_inspect(paths, out, *extra):
    assert main(["inspect", *map(str, paths), "--out", str(out), *extra]) == 0
    return json.loads((out / "report.json").read_text())


def test_report_equals_float64_reference_on_a_synthetic_dump(tmp_path):
    path = write_synthetic(tmp_path / "d")
    report = run_inspect([tmp_path / "d"], tmp_path / "r", *SWEEP)
    labels = [v["label"] for v in report["variants"]]
    assert "drpo(delta=0.05)" in labels and "drpo(delta=12.5)" in labels and "grpo(dual_clip=3)" in labels
    assert report["policy"] == ["after"] and report["anchor"] == ["rollout"]
    assert compare(report, reference([path], params=PARAMS)) > 1000
    # The data exercises what is compared: every category and a long tail occur.
    t = report["total"]
    assert 0 < t["long_tail_share"] < 1
    assert t["methods"]["drpo(delta=0.05)"]["all"]["corrective_frac"] > 0
    assert t["methods"]["drpo(delta=0.05)"]["all"]["amplified_frac"] > 0
    assert t["methods"]["drpo(delta=12.5)"]["all"]["attenuated_frac"] > 0
    assert t["methods"]["grpo(dual_clip=3)"]["all"]["zeroed_frac"] > 0
    assert t["mismatch"]["all"]["unscored_tokens"] == 2  # one per step
    # before the update: pi = logp_before
    report_b = run_inspect([path], tmp_path / "rb", "--policy", "before", "--method", "dppo_kl", "--method", "cispo")
    assert [v["label"] for v in report_b["variants"]] == ["dppo_kl", "cispo"]
    assert compare(report_b, reference([path], ["dppo_kl", "cispo"], policy="before")) > 100
    # artifacts: figures, a self-contained page
    out = tmp_path / "r"
    for name in ("report.md", "tokens_vs_boundaries.png", "buckets.png", "trends.png"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'src="buckets.png"' not in html
    for d in report["disagreements"]:  # context: response tokens only, the token itself included
        assert min(d["context_ids"]) >= 0 and d["context_ids"][d["context_index"]] == d["token_id"]
    spreads = [d["spread"] for d in report["disagreements"]]
    assert len(spreads) == 20 and spreads == sorted(spreads, reverse=True)
    md = (out / "report.md").read_text()
    assert "Where the methods disagree most" in md and "drpo(delta=0.05)" in md


def test_buckets_are_closed_on_the_right_at_every_edge():
    """mu <= 0.01, 0.01-0.1, 0.1-0.5, > 0.5 (docs/inspect.md): a token exactly on an edge is in the
    bucket below it, the next float above it in the bucket above."""
    assert BUCKETS == ("<=0.01", "0.01-0.1", "0.1-0.5", ">0.5")
    mu = []
    for e in (0.01, 0.1, 0.5):
        mu += [e, np.nextafter(e, 1.0)]
    assert bucket_of(np.array([1e-12, *mu, 1.0])).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_streaming_by_row_group_gives_the_same_numbers(tmp_path):
    path = write_synthetic(tmp_path / "d", steps=(1, 2, 3))
    assert pq.ParquetFile(path).num_row_groups == 3
    variants = make_variants(["drpo", "grpo"])
    small, _ = analyze([path], variants, batch_rows=5)
    large, _ = analyze([path], variants, batch_rows=4096)
    # equal up to the order of float64 summation
    flat = lambda x, k="": ([(k, x)] if not isinstance(x, dict) else  # noqa: E731
                            [kv for key, v in x.items() for kv in flat(v, f"{k}.{key}")])
    a, b = flat({"t": small["total"], "s": small["steps"]}), flat({"t": large["total"], "s": large["steps"]})
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, x), (_, y) in zip(a, b):
        assert x == y if not isinstance(x, float) else x == pytest.approx(y, rel=1e-12, abs=1e-15), k
    assert [d["spread"] for d in small["disagreements"]] == [d["spread"] for d in large["disagreements"]]
    assert sum(b.step.size for b in iter_tokens(path, batch_rows=5)) == small["total"]["tokens"]


def test_drpo_train_dump_is_read_and_matches_the_reference(tmp_path):
    args = fast_args(tmp_path, "train.steps=2", "dump.every=1", "rollout.precision=bf16", "train.eval_every=100",
                     "optim.lr=3e-3")
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    files = sorted((tmp_path / "run" / "dumps").glob("*.parquet"))
    assert len(files) == 2  # one complete shard per dumped step
    meta = json.loads(pq.read_schema(files[0]).metadata[META_KEY])
    assert meta["source"] == "drpo_train" and meta["sampling"]["precision"] == "bf16"
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 2 * 16 and [r["step"] for r in rows] == [1] * 16 + [2] * 16
    report = run_inspect(files, tmp_path / "r", *SWEEP)
    assert compare(report, reference(files, params=PARAMS)) > 1000
    assert report["total"]["mismatch"]["all"]["mean_abs_log_ratio"] > 0  # bf16 engine vs fp32 trainer


def _categorical_dump(path, engine_temperature: float = 1.0, engine_top_p: float = 1.0):
    """Tokens sampled from random categorical distributions by an engine at `engine_temperature`
    and `engine_top_p` (renormalised over the nucleus, as engines sample), with its log-probs; the
    trainer's log-probs at temperature 1 without truncation."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, 50, generator=g, dtype=torch.float64) * 3
    engine = torch.log_softmax(logits / engine_temperature, -1)
    if engine_top_p < 1:
        probs, order = engine.exp().sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= engine_top_p  # outside the nucleus
        engine = torch.log_softmax(engine.masked_fill(drop.scatter(-1, order, drop), -math.inf), -1)
    tok = torch.multinomial(engine.exp().view(-1, 50), 1, generator=g).view(64, 10, 1)
    w = DumpWriter(path, metadata={"source": "test"})
    w.write(step=1, response_mask=torch.ones(64, 10, dtype=torch.bool), logp_rollout=engine.gather(-1, tok)[..., 0],
            logp_before=torch.log_softmax(logits, -1).gather(-1, tok)[..., 0], advantage=torch.randn(64, 1, generator=g))
    w.close()
    return w.path


def test_sanity_header_flags_temperature_and_top_p_mismatches(tmp_path):
    same = run_inspect([_categorical_dump(tmp_path / "a")], tmp_path / "ra", "--method", "drpo")
    assert not same["sanity"]["offset_flagged"] and same["total"]["mismatch"]["all"]["mean_abs_log_ratio"] < 1e-6
    hot = run_inspect([_categorical_dump(tmp_path / "b", engine_temperature=0.7)], tmp_path / "rb", "--method", "drpo")
    (flag,) = hot["sanity"]["flags"]
    # per context log r = (T_engine - 1) * log mu + c(context): pooled, the slope is near -0.3
    assert "temperature" in flag and -0.35 < hot["sanity"]["log_ratio_slope"]["slope"] < -0.15
    assert "Warnings" in (tmp_path / "rb" / "report.md").read_text()
    top_p = run_inspect([_categorical_dump(tmp_path / "c", engine_top_p=0.8)], tmp_path / "rc", "--method", "drpo")
    assert any("top-p or top-k" in f for f in top_p["sanity"]["flags"])
    assert 0.8 <= top_p["sanity"]["mean_ratio"] < 0.95  # the trainer's mass on the nucleus


def _write_raw(path, table, meta=None):
    meta = {"format_version": 1, "method": "drpo"} if meta is None else meta
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}), path)
    return path


def _good_table(n=3, seq=4):
    f = pa.list_(pa.float32())
    return pa.table({
        "step": pa.array([1] * n, pa.int64()), "sample_id": pa.array(range(n), pa.int64()),
        "group_id": pa.array([0] * n, pa.int64()),
        "response_mask": pa.array([[True] * seq] * n, pa.list_(pa.bool_())),
        "logp_before": pa.array([[-1.0] * seq] * n, f), "advantage": pa.array([[1.0] * seq] * n, f),
    })


@pytest.mark.parametrize(
    "make, meta, expected",
    [
        (lambda t: t.drop_columns(["advantage"]), None, ["missing required column", "'advantage'"]),
        (lambda t: t.set_column(4, "logp_before", pa.array([[-1.0] * 4, [-1.0] * 3, [-1.0] * 4], pa.list_(pa.float32()))),
         None, ["row 1", "'logp_before'", "ragged"]),
        (lambda t: t.set_column(5, "advantage", pa.array([[1.0] * 4, [1.0] * 4, [1.0, float("nan"), 1.0, 1.0]],
                                                          pa.list_(pa.float32()))),
         None, ["row 2", "'advantage'", "position 1", "NaN"]),
        (lambda t: t.set_column(4, "logp_before", pa.array([[-1.0] * 4, None, [-1.0] * 4], pa.list_(pa.float32()))),
         None, ["row 1", "'logp_before'", "null"]),
        (lambda t: t, {"format_version": 1, "method": "my_loss"}, ["'my_loss'", "not a registered method", "metadata.method"]),
        (lambda t: t.set_column(4, "logp_before", pa.array([[-1.0] * 4, [-1.0, 0.5, -1.0, -1.0], [-1.0] * 4],
                                                            pa.list_(pa.float32()))),
         None, ["row 1", "'logp_before'", "position 1", "0.5", "a log-prob > 0"]),
    ],
    ids=["missing-column", "ragged", "nan", "null", "unknown-method", "positive-logprob"],
)
def test_bad_dumps_name_file_row_and_column(tmp_path, capsys, make, meta, expected):
    path = _write_raw(tmp_path / "bad.parquet", make(_good_table()), meta)
    with pytest.raises(DumpError) as err:  # the reader's checks and the analysis's (the method) alike
        analyze([path], make_variants(["drpo"]))
    msg = str(err.value)
    assert str(path) in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert main(["inspect", str(path), "--out", str(tmp_path / "r")]) == 2
    assert str(path) in capsys.readouterr().err


def test_nan_allowed_only_where_documented(tmp_path):
    t = _good_table()
    t = t.append_column("logp_rollout", pa.array([[float("nan"), -1.0, -1.0, -1.0]] * 3, pa.list_(pa.float32())))
    t = t.set_column(4, "logp_before", pa.array([[-1.0, -1.0, -1.0, float("nan")]] * 3, pa.list_(pa.float32())))
    t = t.set_column(3, "response_mask", pa.array([[True, True, True, False]] * 3, pa.list_(pa.bool_())))
    path = _write_raw(tmp_path / "ok.parquet", t)  # NaN: unscored rollout token; after the response
    batches = list(iter_tokens(path))
    assert sum(b.step.size for b in batches) == 9


@pytest.mark.parametrize("args, expected", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--param", "drpo.gamma=1"], "unknown parameter(s) 'gamma'"),
    (["--param", "drpo.delta=-1"], "'delta' must be > 0"),
    (["--param", "drpo.delta=abc"], "'abc' is not a number"),
])
def test_bad_methods_and_params(tmp_path, capsys, args, expected):
    path = write_synthetic(tmp_path / "d", steps=(1,))
    assert main(["inspect", str(path), "--out", str(tmp_path / "r"), *args]) == 2
    assert expected in capsys.readouterr().err


def test_writer_checks_shapes_and_never_overwrites_a_shard(tmp_path):
    w = DumpWriter(tmp_path, metadata={"source": "test"})
    with pytest.raises(ValueError, match="'logp_before'.*expected \\[2, seq\\]"):
        w.write(step=1, response_mask=np.ones((2, 3), bool), logp_before=np.zeros((3, 3)), advantage=np.zeros(2))
    w.write(step=1, response_mask=np.ones((2, 3), bool), logp_before=np.zeros((2, 3)) - 1, advantage=np.zeros(2))
    w.close()
    first = w.path
    w.write(step=2, response_mask=np.ones((2, 3), bool), logp_before=np.zeros((2, 3)) - 1, advantage=np.zeros(2))
    w.close()
    assert w.path != first and pq.read_table(first).num_rows == 2 and pq.read_table(w.path).num_rows == 2
    assert math.isclose(pq.read_table(first).column("advantage").to_pylist()[0][2], 0.0)


def test_a_users_own_method_is_loaded_with_import(tmp_path, monkeypatch, capsys):
    from drpo.objectives import registry

    (tmp_path / "my_loss_mod.py").write_text(
        "import torch\n"
        "from drpo.objectives import register_method\n"
        "@register_method('my_loss', params={'c': 0.5})\n"
        "class MyLoss:\n"
        "    objective = staticmethod(lambda logp, old, adv, *, c: (adv * 0, adv * 0))\n"
        "    weight = staticmethod(lambda logp, old, adv, *, c: torch.full_like(logp, c))\n"
        "    boundary = None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_synthetic(tmp_path / "d", steps=(1,), method="my_loss")
    assert main(["inspect", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "--import MODULE" in capsys.readouterr().err
    report = run_inspect([path], tmp_path / "r", "--import", "my_loss_mod", "--method", "my_loss")
    assert "my_loss" in registry.METHODS  # removed after the test (conftest restores the registry)
    s = report["total"]["methods"]["my_loss"]["all"]
    assert s["attenuated_frac"] == 1.0 and s["kept_grad_mass"] == pytest.approx(0.5, rel=1e-12)
