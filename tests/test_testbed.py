"""The testbed regime's components (configs/testbed.yaml): the word-problem task and its
verifier, the locally trained BPE tokenizer, the fp8_e2e engine, and the mismatch statistics.
The regime's measured numbers are in docs/testbed.md; these checks are fast."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from drpo.logprobs import sequence_logprobs
from drpo.models import build_tiny_model, fp8_fake_quantize, quantized_forward
from drpo.models.bpe import task_tokenizer, train_bpe_tokenizer
from drpo.rollout import generate, make_engine, sync_weights
from drpo.train.mismatch import mismatch_by_mu, token_mismatch_stats
from drpo.tasks import make_task
from drpo.tasks.wordproblems import final_count, word_problem_reward
from drpo.train.config import ConfigError, load_config

TESTBED = Path(__file__).resolve().parents[1] / "configs" / "testbed.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TESTBED)


@pytest.fixture(scope="module")
def task(cfg):
    return make_task(cfg.task, cfg.seed)


@pytest.fixture(scope="module")
def tok(cfg, task):
    return task_tokenizer(task, cfg.model.vocab_size)


def story_count(prompt: str) -> int:
    """The final count read off the story text alone (independent of the solution writer)."""
    count = int(re.match(r"\w+ has (\d+) ", prompt).group(1))
    for sentence in prompt.split(". ")[1:]:
        k = re.search(r"\b(\d+)\b", sentence)
        if k is None:
            continue  # the question
        up = re.search(r"\b(finds|buys|gets|gives \w+|picks up) \d+ more\b", sentence)
        count += int(k.group(1)) if up else -int(k.group(1))
    return count


def test_reference_solutions_are_right_and_the_verifier_checks_the_final_count(task):
    for i in range(300):
        ex = task.train_example(i)
        want = story_count(ex.prompt)
        assert final_count(ex.answer) == str(want) and want >= 0, ex
        for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", ex.answer):  # every worked step
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), ex.answer
        assert word_problem_reward(ex.answer, ex.answer) == 1.0
        assert word_problem_reward(f"blah. The answer is {want + 1}.", ex.answer) == 0.0
        assert word_problem_reward(f"The answer is {want + 1}. No, the answer is {want}.", ex.answer) == 1.0
        assert word_problem_reward(f"so it is {want}.", ex.answer) == 0.0  # the answer phrase is required
    with pytest.raises(ValueError, match="answer is"):
        word_problem_reward("The answer is 3.", "no final count here")


def test_eval_split_is_held_out_and_streams_are_reproducible(cfg, task):
    held = {ex.prompt for ex in task.eval_examples}
    assert len(held) == cfg.task.eval_size
    assert not held & {task.train_example(i).prompt for i in range(3000)}
    again = make_task(cfg.task, cfg.seed)
    assert [again.train_example(i) for i in range(50)] == [task.train_example(i) for i in range(50)]
    other = make_task(cfg.task, cfg.seed + 1)
    assert [other.train_example(i) for i in range(50)] != [task.train_example(i) for i in range(50)]


def test_bpe_tokenizer_is_deterministic_subword_and_round_trips(cfg, task, tok):
    again = task_tokenizer(task, cfg.model.vocab_size)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()  # same merges, same order
    assert 1000 <= len(tok) <= cfg.model.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    lengths = []
    for i in range(200):
        ex = task.train_example(i)
        ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == ex.answer
        assert tok(ex.prompt)["input_ids"][0] == tok.bos_token_id
        lengths.append(len(ids) + 1)  # + <eos>
        assert len(ids) < len(ex.answer) / 2  # subwords, not characters
    assert min(lengths) >= 32, min(lengths)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["a b c"], 100)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="task.n_ops"):
        load_config(TESTBED, ["task.n_ops=9"])
    with pytest.raises(ConfigError, match="task.reward"):
        load_config(TESTBED, ["task.reward=exact"])
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(TESTBED, ["model.tokenizer=sentencepiece"])


def test_token_mismatch_stats_by_hand():
    behaviour = torch.log(torch.tensor([[0.5, 0.005, 0.2, 0.001, 0.9]]))
    train = behaviour + torch.tensor([[0.01, 0.2, -0.03, -0.4, 99.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    s = token_mismatch_stats(train, behaviour, mask)
    assert s["long_tail_share"] == 0.5 and s["tokens"] == 4 and s["response_length"] == 4
    assert s["mean_abs_log_ratio"] == pytest.approx((0.01 + 0.2 + 0.03 + 0.4) / 4, rel=1e-5)
    assert s["max_abs_log_ratio"] == pytest.approx(0.4, rel=1e-5)
    assert s["long_tail_mean"] == pytest.approx(0.3, rel=1e-5)
    assert s["rest_mean"] == pytest.approx(0.02, rel=1e-4)
    behaviour[0, 0] = math.log(0.6)  # clear of a bin edge
    train = behaviour + torch.tensor([[0.01, 0.2, -0.03, -0.4, 99.0]])
    bins = {(b["mu_from"], b["mu_to"]): b for b in mismatch_by_mu(train, behaviour, mask)}
    assert list(bins) == [(0.0, 0.01), (0.01, 0.1), (0.1, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.0)]
    assert [b["share"] for b in bins.values()] == [0.5, 0.0, 0.25, 0.25, 0.0, 0.0]  # mu 0.005, 0.001 | 0.2 | 0.6
    assert bins[(0.0, 0.01)]["mean_abs_log_ratio"] == pytest.approx(0.3, rel=1e-5)
    assert bins[(0.1, 0.5)]["mean_abs_log_ratio"] == pytest.approx(0.03, rel=1e-4)
    assert bins[(0.5, 0.9)]["mean_abs_log_ratio"] == pytest.approx(0.01, rel=1e-3)
    assert math.isnan(bins[(0.01, 0.1)]["mean_abs_log_ratio"])


def test_mismatch_bins_are_closed_on_the_right_at_every_edge():
    """A token exactly on an edge belongs to the bin below it ((e_i, e_i+1], the first [0, e1]);
    just above, to the next. The edges 0.5, 0.9, 0.99 are exp() of a float64 log exactly; 0.01
    and 0.1 are not (exp steps over them), so those are checked one float64 step either side."""
    exact = {0.5: -0.6931471805599453, 0.9: -0.10536051565782628, 0.99: -0.01005033585350145}
    edges = (0.01, 0.1, 0.5, 0.9, 0.99)
    for k, e in enumerate(edges):
        if e in exact:
            logs = [exact[e]]
            assert math.exp(logs[0]) == e
        else:
            logs = [math.log(e) - 1e-12]
        logs.append(math.log(e) + 1e-12)  # just above the edge
        behaviour = torch.tensor([logs], dtype=torch.float64)
        bins = mismatch_by_mu(behaviour + 0.1, behaviour, torch.ones_like(behaviour, dtype=torch.bool))
        assert [b["share"] for b in bins].index(0.5) == k, (e, bins)  # on (or just below) the edge: bin k
        assert [b["share"] for b in bins][k + 1] == 0.5, (e, bins)  # just above: bin k + 1
        assert bins[k]["mu_to"] == e and bins[k + 1]["mu_from"] == e


@pytest.fixture(scope="module")
def policy(cfg, tok):
    # The testbed architecture, random init; a larger head scale gives peaked, varied
    # distributions like a trained policy's (near-uniform ones would hide the mismatch).
    m = cfg.model
    model = build_tiny_model(tok, hidden_size=m.hidden_size, num_layers=2, num_heads=m.num_heads,
                             intermediate_size=m.intermediate_size, max_position=m.max_position, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


def _mismatch(policy, precision, prompts, tok):
    engine = make_engine(policy, precision)
    r = generate(engine, prompts, n_samples=4, max_new_tokens=32, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), quantized_forward(policy, precision):  # the trainer's forward
        logp = sequence_logprobs(policy, r.input_ids, r.attention_mask, response_start=r.prompt_len)
    return token_mismatch_stats(logp, r.behaviour_logp, r.response_mask)["mean_abs_log_ratio"]


def test_mismatch_ordering_and_fp8_e2e_is_not_zero(policy, task, tok):
    torch.manual_seed(0)
    prompts = [tok(task.train_example(i).prompt)["input_ids"] for i in range(4)]
    m = {p: _mismatch(policy, p, prompts, tok) for p in ("fp32", "bf16", "fp8_e4m3", "fp8_e2e")}
    assert m["fp32"] < 1e-5, m
    assert m["fp32"] < m["bf16"] < m["fp8_e4m3"], m
    # Same fp8 weights on both sides, different kernels: clearly above fp32, below fp8 rollouts.
    assert 1e-3 < m["fp8_e2e"] < m["fp8_e4m3"], m


def test_fp8_e2e_engine_requantizes_from_the_fp32_master_on_sync(policy, tok):
    engine = make_engine(policy, "fp8_e2e")
    trained = build_tiny_model(tok, num_layers=2, hidden_size=128, num_heads=4, intermediate_size=384,
                               max_position=128, seed=11)
    sync_weights(engine, trained, step=3)
    expected = fp8_fake_quantize(trained.lm_head.weight, torch.float8_e4m3fn).bfloat16()
    assert engine.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(engine.model.lm_head.weight, expected)
    # The trainer side of fp8_e2e reads the same fp8 weights (kept in fp32).
    with quantized_forward(trained, "fp8_e2e"):
        torch.testing.assert_close(trained.lm_head.weight.bfloat16(), expected, rtol=0, atol=0)
    assert not math.isclose(float(engine.model.lm_head.weight.float().sum()),
                            float(policy.lm_head.weight.detach().sum()), rel_tol=1e-3)



def test_fp8_activation_quantization_per_token_and_straight_through():
    from drpo.models.precision import fp8_fake_quantize_activations

    x = (torch.randn(3, 5, 16, dtype=torch.float64) * torch.tensor([0.01, 1.0, 300.0])[:, None, None]).float()
    x[0, 0] = 0.0  # an all-zero token keeps scale 1
    x.requires_grad_(True)
    q = fp8_fake_quantize_activations(x, torch.float8_e4m3fn)
    for row, qrow in zip(x.detach().reshape(-1, 16), q.detach().reshape(-1, 16)):
        amax = row.abs().max()
        scale = amax / 448.0 if amax > 0 else torch.tensor(1.0)
        unscaled = qrow / scale
        torch.testing.assert_close(unscaled.to(torch.float8_e4m3fn).float(), unscaled, rtol=1e-6, atol=0)
        assert (qrow - row).abs().max() <= 2 ** -4 * amax + 1e-30  # within half an e4m3 step of the max
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through


def test_fp8_engine_quantizes_linear_inputs_but_not_the_lm_head(policy):
    engine = make_engine(policy, "fp8_e4m3")
    layers = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    hooked = [m for m in layers if m._forward_pre_hooks]
    assert engine.model.lm_head not in hooked and len(hooked) == len(layers) - 1
    sync_weights(engine, policy, step=1)  # re-quantizing does not stack a second hook
    assert all(len(m._forward_pre_hooks) == 1 for m in hooked)
    with quantized_forward(policy, "fp8_e2e"):
        assert sum(bool(m._forward_pre_hooks) for m in policy.modules()) == len(hooked)
    assert not any(getattr(m, "_forward_pre_hooks", None) for m in policy.modules())


def _no_bare_constant(name):
    raise AssertionError(f"bare {name} in the JSON (not valid JSON)")


def test_mismatch_cli_on_a_config(tmp_path):
    import json

    from drpo.cli import main

    out = tmp_path / "m.json"
    assert main(["mismatch", "--config", str(TESTBED), "--set", "warmstart.enabled=false", "--set", "model.num_layers=1",
                 "--precisions", "fp32,bf16", "--prompts", "3", "--n-samples", "2", "--max-new-tokens", "8",
                 "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text(), parse_constant=_no_bare_constant)["precisions"]  # valid JSON: no bare NaN
    assert rows["fp32"]["mean_abs_log_ratio"] < 1e-5 < rows["bf16"]["mean_abs_log_ratio"]
    assert "nan" in [b["mean_abs_log_ratio"] for b in rows["fp32"]["by_mu"]]  # an empty bin: written as "nan"
    for row in rows.values():
        assert 0 <= row["long_tail_share"] <= 1 and 1 <= row["response_length"] <= 8
        assert row["tokens"] == pytest.approx(row["response_length"] * 3 * 2)
