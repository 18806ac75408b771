"""Config loading, overrides and the errors they must produce."""

import subprocess
import sys

import pytest

from drpo.objectives import METHODS
from drpo.train.config import ConfigError, load_config, to_yaml


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = load_config()
    assert cfg.objective.method == "drpo"
    assert cfg.objective.resolved_params == dict(METHODS["drpo"].params)
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_config_accepts_exactly_the_engine_precisions():
    from drpo.models import PRECISIONS, check_precision

    for precision in PRECISIONS:
        assert load_config(None, [f"rollout.precision={precision}"]).rollout.precision == check_precision(precision)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.precision=fp9"])
    assert all(repr(precision) in str(err.value) for precision in PRECISIONS), str(err.value)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 3\nrollout:\n  precision: bf16\n  n_samples: 4\nobjective:\n  method: grpo\n")
    cfg = load_config(p, ["rollout.n_samples=2", "objective.params.eps_high=0.28", "train.threads=1"])
    assert (cfg.seed, cfg.rollout.precision, cfg.rollout.n_samples) == (3, "bf16", 2)
    assert cfg.objective.resolved_params["eps_high"] == 0.28
    assert cfg.objective.resolved_params["eps_low"] == METHODS["grpo"].params["eps_low"]
    assert cfg.train.threads == 1


def test_set_delta_override():
    cfg = load_config(None, ["objective.params.delta=0.15"])
    assert cfg.objective.resolved_params["delta"] == 0.15


def test_shipped_presets_validate():
    from pathlib import Path

    presets = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert presets, "no presets in configs/"
    for p in presets:
        load_config(p)


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["rollout.precision=fp9"], ["rollout.precision", "'fp9'"]),
        (["rollout.n_samples=0"], ["rollout.n_samples", "0", "greater than or equal to 1"]),
        (["optim.lr=-1"], ["optim.lr", "-1"]),
        (["optim.lr=fast"], ["optim.lr", "'fast'"]),
        (["optim.lr=inf"], ["optim.lr", "'inf'", "finite"]),  # would train to NaN and read as a divergence
        (["rollout.temperature=nan"], ["rollout.temperature", "'nan'", "finite"]),
        (["rollout.top_p=1.5"], ["rollout.top_p", "1.5"]),
        (["objective.agg=sum"], ["objective.agg", "'sum'"]),
        (["advantage.estimator=median"], ["advantage.estimator", "'median'"]),
        (["objective.method=ppo2"], ["unknown method 'ppo2'", "drpo"]),
        (["objective.params.delta=-0.1"], ["'delta'", "-0.1"]),
        (["objective.params.eps=0.2"], ["unknown parameter", "'eps'"]),
        (["rollout.temprature=0.7"], ["unknown config key 'rollout.temprature'"]),
        (["nonsense=1"], ["unknown config key 'nonsense'"]),
        (["task.name=jsonl"], ["task.dataset"]),
        (["rollout.prompts_per_step=3", "rollout.n_samples=3", "optim.updates_per_rollout=2"], ["optim.updates_per_rollout=2"]),
        (["model.hidden_size=130"], ["num_heads"]),
        (["model.name=/no/such/model"], ["model.name", "'/no/such/model'", "existing local model directory"]),
    ],
)
def test_invalid_values_name_key_and_value(overrides, must_contain):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for piece in must_contain:
        assert piece in str(err.value)


@pytest.mark.parametrize("item", ["novalue", "=3", "a..b=1"])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config(None, [item])


def test_set_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=2"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"seed: 1\nmodel:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^config file .*latin1.yaml:3: not UTF-8 text \(byte 0xe9 at column 12\)"):
        load_config(latin1)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(lst)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "drpo.cli", "train", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    out = tmp_path / "run"
    res = _cli("--out", str(out), "--set", "objective.method=nope")
    assert res.returncode == 2
    assert "unknown method 'nope'" in res.stderr
    assert not out.exists()  # stopped at start: nothing written


def test_cli_missing_dataset_file(tmp_path):
    res = _cli("--out", str(tmp_path / "run"), "--set", "task.name=jsonl", "--set", f"task.dataset={tmp_path}/none.jsonl")
    assert res.returncode == 2
    assert "dataset file not found" in res.stderr and "none.jsonl" in res.stderr
    assert not (tmp_path / "run").exists()


def test_cli_malformed_dataset_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"\n')
    res = _cli("--out", str(tmp_path / "run"), "--set", "task.name=jsonl", "--set", f"task.dataset={data}")
    assert res.returncode == 2
    assert f"{data}:2: invalid JSON" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["default", "short", "smollm2", "testbed"])
def test_config_files_hold_only_what_differs_from_the_defaults(name):
    # Each setting has one home: the typed config's defaults (objective parameters: the
    # method's registered defaults); a config file states only the keys it changes.
    from pathlib import Path

    from drpo.train.config import Config, load_yaml

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    tree = load_yaml(path)
    cfg = load_config(path)  # it also validates
    defaults = Config().model_dump(mode="json")
    restated = []
    for section, values in tree.items():
        if not isinstance(values, dict):
            restated += [section] if defaults[section] == values else []
            continue
        for key, value in values.items():
            if (section, key) == ("objective", "params"):
                registered = METHODS[cfg.objective.method].params
                restated += [f"objective.params.{p}" for p, v in value.items() if registered[p] == v]
            elif defaults[section][key] == value:
                restated.append(f"{section}.{key}")
    assert not restated, f"{path.name} restates built-in defaults: {restated}"


def test_trainer_doc_states_the_typed_defaults():
    # docs/trainer.md's key tables restate each default for readers; this keeps them from
    # drifting from the one place the defaults live (the typed config)
    import re
    from pathlib import Path

    import yaml

    from drpo.train.config import Config

    defaults = Config().model_dump(mode="json")
    text = (Path(__file__).resolve().parents[2] / "docs" / "trainer.md").read_text()
    body = text.split("## Config keys", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for section, table in re.findall(r"### (?:`(\w+)`|top level)[^\n]*\n(.*?)(?=\n### |\Z)", body, re.S):
        expected = defaults[section] if section else defaults
        for line in table.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) < 3 or not cells[0].startswith("`"):
                continue
            keys = re.findall(r"`(\w+)`", cells[0])
            stated = re.sub(r" \(.*\)$", "", cells[1]).split(", ")
            assert len(keys) == len(stated), line
            for key, doc in zip(keys, stated):
                value, doc = expected[key], doc.strip("`")
                if isinstance(value, bool) or value is None or isinstance(value, dict):
                    ok = yaml.safe_load(doc) == value
                elif isinstance(value, (int, float)):
                    ok = float(doc) == value
                else:
                    ok = doc == value
                assert ok, f"docs/trainer.md says {section or 'top level'}.{key} = {doc!r}; the default is {value!r}"
                checked += 1
    assert checked >= 40  # every table was read


@pytest.mark.parametrize("sets", [
    ["rollout.prompts_per_step=4", "rollout.n_samples=4", "optim.updates_per_rollout=2", "optim.grad_accum=3"],
    ["rollout.prompts_per_step=3", "rollout.n_samples=3", "optim.updates_per_rollout=2"],
])
def test_a_batch_that_does_not_split_into_micro_batches_is_refused(sets):
    """16 samples in 2 mini-batches of 8 do not split into 3 micro-batches (nor 9 into 2): training
    would skip samples, so the config is refused naming the keys."""
    with pytest.raises(ConfigError, match=r"must split evenly into optim.updates_per_rollout=2 mini-batches"):
        load_config(None, sets)
    load_config(None, ["rollout.prompts_per_step=4", "rollout.n_samples=4", "optim.updates_per_rollout=2",
                       "optim.grad_accum=4"])  # 16 = 2 x 8 = 2 x 4 x 2: fine
