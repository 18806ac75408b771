"""Runner pieces: commands, divergence read from the exit code of a real diverging run, diverged rows."""

import sys

from drpo.study.grid import expand, parse_grid
from drpo.study.report import diverged_rows
from drpo.cli import main
from drpo.study.runner import DIVERGED_EXIT, default_workers, train_command
from drpo.train.config import load_config

GRID = {"name": "g", "base": {"train.steps": 8, "optim.lr": 1e-4}, "settings": {"bf16": {"rollout.precision": "bf16"}},
        "methods": [{"name": "d", "method": "drpo", "params": {"delta": 0.15, "advantage_weighted": False}}],
        "seeds": [3]}


def test_train_command_round_trips_into_the_trainer_config(tmp_path):
    spec = expand(parse_grid(GRID))[0]
    cmd = train_command(spec, tmp_path, resume=True, threads=2)
    assert cmd[:5] == [sys.executable, "-m", "drpo.cli", "train", "--no-progress"]
    assert cmd[-3:] == ["--out", str(tmp_path / "runs" / "bf16__d__s3"), "--resume"]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    cfg = load_config(None, sets)  # what `drpo train` will see
    assert cfg.seed == 3 and cfg.train.steps == 8 and cfg.optim.lr == 1e-4 and cfg.train.threads == 2
    assert cfg.rollout.precision == "bf16" and cfg.objective.method == "drpo"
    assert cfg.objective.params == {"delta": 0.15, "advantage_weighted": False}


def test_a_run_whose_weights_go_non_finite_exits_diverged(tmp_path, capsys):
    # lr 1e30 with decoupled weight decay 1 scales every weight by -1e30 per optimizer step, with
    # or without reward signal: the weights overflow within the first rollout batch
    from train_helpers import fast_args

    args = ["train", *fast_args(tmp_path, "warmstart.on_miss=continue", "optim.lr=1e30", "optim.weight_decay=1.0",
                                "train.steps=2"), "--no-progress", "--out", str(tmp_path / "run")]
    assert main(args) == DIVERGED_EXIT
    err = capsys.readouterr().err
    assert "drpo train: diverged: non-finite" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()  # not a finished run


def test_diverged_rows_count_accuracy_zero_to_the_planned_end():
    rows = [{"step": 0, "eval/accuracy": 0.7}, {"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": 0.4}]
    out = diverged_rows(rows, {"overrides": {"train.steps": 10}})
    assert out[:3] == rows
    assert [(r["step"], r["eval/accuracy"]) for r in out[3:]] == [(3, 0.0), (10, 0.0)]
    # diverging on the last planned step adds just that step
    assert [r["step"] for r in diverged_rows(rows, {"overrides": {"train.steps": 3}})[3:]] == [3]


def test_default_workers_is_cores_over_threads():
    import os

    cores = len(os.sched_getaffinity(0))
    assert default_workers(1) == cores
    assert default_workers(cores * 4) == 1
