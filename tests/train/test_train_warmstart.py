"""Warm-start cache: keyed by what determines it, reused, rebuilt when damaged; a budget that
runs out below the target stops the run with a clear error and is never served as a success;
and the SFT does reach its target accuracy."""

import pytest
import torch

from drpo.cli import main as drpo_main
from drpo.models import build_tiny_model, make_char_tokenizer
from drpo.tasks import make_task
from drpo.train import warmstart as ws_mod
from drpo.train.schedule import lr_factor
from drpo.train.warmstart import WarmstartError, cache_key, greedy_accuracy, warm_start
from train_helpers import fast_args, fast_config

QUIET = dict(log=lambda *_: None)


def _fresh(cfg):
    tok = make_char_tokenizer()
    m = cfg.model
    model = build_tiny_model(tok, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                             intermediate_size=m.intermediate_size, max_position=m.max_position, seed=cfg.seed)
    return model, tok


def test_cache_key_tracks_what_determines_the_weights(tmp_path, monkeypatch):
    base = fast_config(tmp_path)
    assert cache_key(base) == cache_key(fast_config(tmp_path, "optim.lr=0.5", "objective.method=grpo", "train.steps=7"))
    assert cache_key(base) == cache_key(fast_config(tmp_path / "elsewhere"))  # cache_dir is not part of it
    assert cache_key(base) == cache_key(fast_config(tmp_path, "warmstart.on_miss=error"))  # what a miss does
    for change in ("seed=1", "model.hidden_size=64", "task.digits=3", "warmstart.lr=0.01",
                   "warmstart.target_accuracy=0.5", "warmstart.schedule=constant", "warmstart.check_size=8",
                   "warmstart.warmup_steps=9", "rollout.max_new_tokens=4"):
        assert cache_key(base) != cache_key(fast_config(tmp_path, change)), change
    assert cache_key(base, "cpu") != cache_key(base, "cuda")  # other kernels, other weights
    key = cache_key(base)
    lib = ws_mod.transformers  # the module object the key reads (the lazy module may be re-created on import)
    monkeypatch.setattr(lib, "__version__", lib.__version__ + ".other")
    assert cache_key(base) != key
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert cache_key(base) != key


def test_lr_schedule_warms_up_then_decays_to_zero(tmp_path):
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1 * 0.5 * (1 + 1.0))  # 1/10 of the way up, cos(0) = 1
    assert lr_factor(50, 10, 100, "cosine") == pytest.approx(0.5)  # cos(pi/2) = 0: half way down
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 10, 100, "constant") for s in (0, 9, 99)] == pytest.approx([0.1, 1.0, 1.0])


def test_cached_then_reused_then_rebuilt_when_damaged(tmp_path):
    cfg = fast_config(tmp_path)  # 10 SFT steps: a miss, allowed by on_miss=continue
    task = make_task(cfg.task, cfg.seed)
    model, tok = _fresh(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    first = warm_start(model, tok, task, cfg, **QUIET)
    assert first["cached"] is False and first["steps"] == cfg.warmstart.steps and first["reached"] is False
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # SFT changed the weights

    again, _ = _fresh(cfg)
    second = warm_start(again, tok, task, cfg, **QUIET)
    assert second["cached"] is True and second["path"] == first["path"] and second["reached"] is False
    assert all(torch.equal(again.state_dict()[k], trained[k]) for k in trained)

    with open(first["path"], "r+b") as f:  # damage the cache file
        f.truncate(100)
    logs = []
    third_model, _ = _fresh(cfg)
    third = warm_start(third_model, tok, task, cfg, log=logs.append)
    assert third["cached"] is False
    assert any("unreadable" in m for m in logs)
    # no terminal here (tqdm's bar is off), so every accuracy check is a log line
    n = cfg.warmstart.steps
    assert sum(m.startswith("warm start: step ") for m in logs) == len(range(cfg.warmstart.check_every, n + 1,
                                                                             cfg.warmstart.check_every)) + (n % cfg.warmstart.check_every > 0)
    assert any(m.startswith(f"warm start: step {n}/{n}, loss ") for m in logs)
    # same seed, same data: the rebuilt warm start is the same
    assert all(torch.equal(third_model.state_dict()[k], trained[k]) for k in trained)


def test_budget_below_target_stops_with_clear_error_and_is_never_a_cached_success(tmp_path, monkeypatch):
    cfg = fast_config(tmp_path, "warmstart.on_miss=error", "warmstart.steps=6", "warmstart.check_every=3")
    task = make_task(cfg.task, cfg.seed)
    model, tok = _fresh(cfg)
    with pytest.raises(WarmstartError) as err:
        warm_start(model, tok, task, cfg, **QUIET)
    entries = list((tmp_path / "cache" / "warmstart").glob("*.pt"))
    assert len(entries) == 1
    blob = torch.load(entries[0], map_location="cpu", weights_only=True)
    assert blob["info"]["reached"] is False and blob["info"]["check_accuracy"] < cfg.warmstart.target_accuracy
    # the message names the target, what was reached and the budget spent
    msg = str(err.value)
    assert f"greedy check accuracy {blob['info']['check_accuracy']:.3f} < warmstart.target_accuracy=0.4" in msg
    assert "after all warmstart.steps=6 SFT steps" in msg and "warmstart.on_miss=continue" in msg

    # asked again, the cached miss fails the same way without re-training ...
    def no_training(*a, **k):
        raise AssertionError("a cached miss was re-trained")

    monkeypatch.setattr(ws_mod, "train_warmstart", no_training)
    with pytest.raises(WarmstartError, match="missed its target"):
        warm_start(_fresh(cfg)[0], tok, task, cfg, **QUIET)
    # ... and with on_miss=continue it is served, marked as the miss it is, with a warning
    cont = cfg.model_copy(update={"warmstart": cfg.warmstart.model_copy(update={"on_miss": "continue"})})
    logs = []
    info = warm_start(_fresh(cfg)[0], tok, task, cont, log=logs.append)
    assert info["cached"] is True and info["reached"] is False
    assert any(m.startswith("warning: warm start missed its target") for m in logs)


def test_cli_reports_the_miss_without_traceback(tmp_path, capsys):
    args = fast_args(tmp_path, "warmstart.on_miss=error", "warmstart.steps=4", "warmstart.check_every=2")
    rc = drpo_main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "drpo train: warm start missed its target" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_sft_stops_at_target_accuracy(tmp_path):
    # 1-digit sums are learned quickly; the run must stop at the first check at/above target.
    cfg = fast_config(tmp_path, "task.digits=1", "task.eval_size=10", "model.hidden_size=64", "model.num_layers=2",
                      "model.num_heads=4", "model.intermediate_size=128", "warmstart.steps=600",
                      "warmstart.check_every=20", "warmstart.check_size=64", "warmstart.target_accuracy=0.5",
                      "warmstart.batch_size=32", "warmstart.on_miss=error")
    task = make_task(cfg.task, cfg.seed)
    model, tok = _fresh(cfg)
    info = warm_start(model, tok, task, cfg, **QUIET)
    assert info["reached"] is True and info["check_accuracy"] >= 0.5
    assert info["steps"] < 600 and info["steps"] % 20 == 0
    # an independent measurement on other problems agrees that the policy is competent
    acc = greedy_accuracy(model, tok, task, range(5000, 5064), "{prompt}", 5)
    assert acc >= 0.3


def test_cache_key_tracks_the_data_behind_an_unchanged_config(tmp_path):
    """A dataset file edited in place (same path, same config) must not load the old weights."""
    data = tmp_path / "problems.jsonl"
    cfg = fast_config(tmp_path, "task.name=jsonl", f"task.dataset={data}", "task.eval_size=1")
    tok = make_char_tokenizer()
    digests = []
    for answers in (("4", "6"), ("5", "6")):
        data.write_text("".join(f'{{"prompt": "2+{a[0]}", "answer": "{a}"}}\n' for a in answers) * 4)
        digests.append(ws_mod.examples_digest(make_task(cfg.task, cfg.seed), tok, cfg.task.prompt_template))
    assert digests[0] != digests[1]
    assert cache_key(cfg, "cpu", digests[0]) != cache_key(cfg, "cpu", digests[1])
