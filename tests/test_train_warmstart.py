"""Warm-start cache: keyed by what determines it, reused, rebuilt when damaged; and the SFT
does reach its target accuracy."""

import pytest
import torch

from drpo.models import build_tiny_model, make_char_tokenizer
from drpo.tasks import make_task
from drpo.train.warmstart import cache_key, greedy_accuracy, warm_start
from train_helpers import fast_config


def _fresh(cfg):
    tok = make_char_tokenizer()
    m = cfg.model
    model = build_tiny_model(tok, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                             intermediate_size=m.intermediate_size, max_position=m.max_position, seed=cfg.seed)
    return model, tok


def test_cache_key_tracks_what_determines_the_weights(tmp_path):
    base = fast_config(tmp_path)
    assert cache_key(base) == cache_key(fast_config(tmp_path, "optim.lr=0.5", "objective.method=grpo", "train.steps=7"))
    assert cache_key(base) == cache_key(fast_config(tmp_path / "elsewhere"))  # cache_dir is not part of it
    for change in ("seed=1", "model.hidden_size=64", "task.digits=3", "warmstart.lr=0.01", "warmstart.target_accuracy=0.5"):
        assert cache_key(base) != cache_key(fast_config(tmp_path, change)), change


def test_cached_then_reused_then_rebuilt_when_damaged(tmp_path):
    cfg = fast_config(tmp_path)
    task = make_task(cfg.task, cfg.seed)
    model, tok = _fresh(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    first = warm_start(model, tok, task, cfg, log=lambda *_: None)
    assert first["cached"] is False and first["steps"] == cfg.warmstart.steps
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # SFT changed the weights

    again, _ = _fresh(cfg)
    second = warm_start(again, tok, task, cfg, log=lambda *_: None)
    assert second["cached"] is True and second["path"] == first["path"]
    assert all(torch.equal(again.state_dict()[k], trained[k]) for k in trained)

    with open(first["path"], "r+b") as f:  # damage the cache file
        f.truncate(100)
    logs = []
    third_model, _ = _fresh(cfg)
    third = warm_start(third_model, tok, task, cfg, log=logs.append)
    assert third["cached"] is False
    assert any("unreadable" in m for m in logs)
    # same seed, same data: the rebuilt warm start is the same
    assert all(torch.equal(third_model.state_dict()[k], trained[k]) for k in trained)


@pytest.mark.slow
def test_sft_stops_at_target_accuracy(tmp_path):
    # 1-digit sums are learned quickly; the run must stop at the first check at/above target.
    cfg = fast_config(tmp_path, "task.digits=1", "task.eval_size=10", "model.hidden_size=64", "model.num_layers=2",
                      "model.num_heads=4", "model.intermediate_size=128", "warmstart.steps=600",
                      "warmstart.check_every=20", "warmstart.check_size=64", "warmstart.target_accuracy=0.5",
                      "warmstart.batch_size=32")
    task = make_task(cfg.task, cfg.seed)
    model, tok = _fresh(cfg)
    info = warm_start(model, tok, task, cfg, log=lambda *_: None)
    assert info["check_accuracy"] >= 0.5
    assert info["steps"] < 600 and info["steps"] % 20 == 0
    # an independent measurement on other problems agrees that the policy is competent
    acc = greedy_accuracy(model, tok, task, range(5000, 5064), "{prompt}", 5)
    assert acc >= 0.3
