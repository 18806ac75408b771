"""Grid validation, expansion and presets."""

from pathlib import Path

import pytest
import yaml

from drpo.study.cli_compare import select
from drpo.study.grid import expand, format_value, load_grid, parse_grid
from drpo.study.presets import PRESETS, get_preset
from drpo.train.config import load_config, parse_override

GRID = {
    "name": "g",
    "base": {"train.steps": 4, "rollout.precision": "fp32"},
    "settings": {"a": {}, "b": {"rollout.precision": "bf16", "optim.lr": 0.01}},
    "methods": ["grpo", {"name": "drpo-d", "method": "drpo", "params": {"delta": 0.15}}],
    "seeds": [0, 1],
    "sweeps": [{"settings": ["b"], "variants": [
        {"name": "drpo-d", "method": "drpo", "params": {"delta": 0.15}},  # repeats a main variant: once
        {"name": "drpo-noadv", "method": "drpo", "params": {"advantage_weighted": False}}]}],
}


def test_expand_counts_and_overrides():
    runs = expand(parse_grid(GRID))
    # 2 settings x 2 methods x 2 seeds + 1 new sweep variant x 1 setting x 2 seeds
    assert len(runs) == 2 * 2 * 2 + 2
    ids = [r.run_id for r in runs]
    assert len(set(ids)) == len(ids)
    b = next(r for r in runs if r.run_id == "b__drpo-noadv__s1")
    assert b.overrides == {"train.steps": 4, "rollout.precision": "bf16", "optim.lr": 0.01, "seed": 1,
                           "objective.method": "drpo", "objective.params": "{}",  # drop a config file's
                           "objective.params.advantage_weighted": False}
    a = next(r for r in runs if r.run_id == "a__drpo-d__s0")
    assert a.overrides["rollout.precision"] == "fp32" and a.overrides["objective.params.delta"] == 0.15


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"methods": ["nope"]}, "unknown method 'nope'"),
        ({"methods": [{"name": "x", "method": "drpo", "params": {"eps": 1.0}}]}, "unknown parameter"),
        ({"methods": [{"name": "x", "method": "drpo", "params": {"delta": -1.0}}]}, "delta"),
        ({"seeds": [0, 0]}, "duplicates"),
        ({"seeds": []}, "at least one seed"),
        ({"settings": {}}, "at least one setting"),
        ({"settings": {"a": {"seed": 3}}}, "set by the grid"),
        ({"base": {"objective.params.delta": 1.0}}, "set by the grid"),
        ({"settings": {"a": {"optim.lr": [1, 2]}}}, "scalar"),
        ({"settings": {"a b": {}}}, "setting name"),
        ({"settings": {"a": {"optim..lr": 1}}}, "dotted config path"),
        ({"sweeps": [{"settings": ["zzz"], "variants": ["grpo"]}]}, "unknown setting 'zzz'"),
        ({"methods": ["grpo", {"name": "grpo", "method": "grpo", "params": {"eps_low": 0.1}}]}, "defined twice"),
        ({"extra_field": 1}, "extra_field"),
    ],
)
def test_grid_errors_name_the_field(patch, match):
    with pytest.raises(ValueError, match=match):
        parse_grid({**GRID, **patch})


def test_load_grid_file_errors(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_grid(bad)
    with pytest.raises(ValueError, match="missing.yaml"):
        load_grid(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ValueError, match=r"^grid file .*latin1.yaml:1: not UTF-8 text \(byte 0xe9 at column 10\)"):
        load_grid(latin1)
    good = tmp_path / "ok.yaml"
    good.write_text(yaml.safe_dump(GRID))
    assert len(expand(load_grid(good))) == 10


@pytest.mark.parametrize("value", [0.01, 1e-4, 3, True, False, "fp8_e4m3", 12.5, None])
def test_format_value_round_trips_through_train_overrides(value):
    path, parsed = parse_override(f"a.b={format_value(value)}")
    assert path == ["a", "b"] and parsed == value and type(parsed) is type(value)


def test_presets_cover_the_issue_grid():
    g = get_preset("paper-mini")
    assert g.config == "configs/testbed.yaml"  # the testbed regime, not the toy one
    methods = {v.method for v in g.methods}
    assert methods == {"pg_is", "grpo", "spo", "dppo_tv", "dppo_kl", "drpo", "mask_drpo"}
    precisions = {ov.get("rollout.precision") for ov in g.settings.values()}
    assert {"bf16", "fp8_e5m2"} <= precisions  # rollout mismatch, from low to high
    assert len(g.seeds) >= 5
    swept = [v for sw in g.sweeps for v in sw.variants]
    assert {v.params.get("delta") for v in swept if v.method == "drpo"} >= {0.05, 1.0, 12.5}
    assert any(v.params.get("advantage_weighted") is False for v in swept)
    assert get_preset("quick").config is None  # the toy regime, stated key by key


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_run_is_a_valid_train_config(name):
    # the grid's keys must be real `drpo train` config keys with valid values, on its config file
    grid = get_preset(name)
    config = REPO / grid.config if grid.config else None
    if config is not None and not config.is_file():
        pytest.skip(f"{grid.config} is not in this checkout yet (the testbed config lands separately)")
    for spec in expand(grid):
        cfg = load_config(config, [f"{k}={format_value(v)}" for k, v in spec.overrides.items()])
        assert cfg.seed == spec.seed and cfg.objective.method == spec.variant.method


def test_select_narrows_and_validates():
    g = parse_grid(GRID)
    s = select(g, overrides=["train.steps=2"], seeds=3, methods="drpo-noadv,grpo", settings="b")
    runs = expand(s)
    assert {r.run_id for r in runs} == {f"b__{v}__s{i}" for v in ("grpo", "drpo-noadv") for i in range(3)}
    assert all(r.overrides["train.steps"] == 2 for r in runs)
    with pytest.raises(ValueError, match="--methods: unknown"):
        select(g, overrides=[], seeds=None, methods="spo", settings=None)
    with pytest.raises(ValueError, match="--settings: unknown"):
        select(g, overrides=[], seeds=None, methods=None, settings="zz")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        select(g, overrides=["novalue"], seeds=None, methods=None, settings=None)
    with pytest.raises(ValueError, match="set by the grid"):
        select(g, overrides=["seed=3"], seeds=None, methods=None, settings=None)


def test_presets_restate_no_default():
    # a preset's base holds only what differs from drpo train's defaults (one home per setting)
    from drpo.train.config import Config

    defaults = Config().model_dump(mode="json")
    for name, preset in PRESETS.items():
        for key, value in preset.get("base", {}).items():
            section, field = key.split(".")
            assert defaults[section][field] != value, f"preset {name!r} restates the default {key}={value!r}"


def test_missing_config_file_is_refused_before_anything_is_written(tmp_path, capsys):
    from drpo.cli import main

    out = tmp_path / "out"
    assert main(["compare", "--preset", "quick", "--out", str(out), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err and not out.exists()
