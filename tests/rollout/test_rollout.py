"""The rollout engine: greedy parity with transformers' generate, behaviour log-probs equal to
a full recomputation of the distribution sampled from, masks, seeding, sync, precisions."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from drpo.models.logprobs import sequence_logprobs
from drpo.models import build_tiny_model, make_char_tokenizer
from drpo.rollout import generate, left_pad, make_engine, sampling_logprobs, sync_weights

TEXTS = ["12+34=", "7+8=", "100+250=", "9="]


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module")
def policy(tok):
    # Larger init scale than the default so the random model has peaked, varied distributions
    # (a real policy's are; near-uniform ones would make every check trivially loose).
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t)["input_ids"] for t in TEXTS]


def hf_greedy(model, prompts, pad, eos, max_new):
    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=pad)
    return out[:, ids.shape[1]:]


def test_greedy_equals_transformers_generate_and_eos_masks(policy, tok, prompts):
    pad = tok.pad_token_id
    # Pick as "EOS" a token the greedy model really emits mid-way for some rows.
    free = hf_greedy(policy, prompts, pad, eos=None, max_new=12)
    eos = int(free[0, 3])
    expected = hf_greedy(policy, prompts, pad, eos=eos, max_new=12)
    engine = make_engine(policy, "fp32")
    r = generate(engine, prompts, n_samples=1, max_new_tokens=12, eos_token_id=eos, pad_token_id=pad, greedy=True)
    width = r.response_ids.shape[1]
    assert torch.equal(r.response_ids, expected[:, :width])
    assert (expected[:, width:] == pad).all()
    # Masks by hand: a response runs through its first EOS; everything after is padding.
    for i in range(len(prompts)):
        row = r.response_ids[i].tolist()
        n = row.index(eos) + 1 if eos in row else width
        assert r.response_mask[i].tolist() == [True] * n + [False] * (width - n)
        assert r.finished[i].item() == (eos in row)
        assert all(t == pad for t in row[n:])
        assert r.attention_mask[i, r.prompt_len:].tolist() == [1] * n + [0] * (width - n)
        assert (r.behaviour_logp[i, n:] == 0).all()
        plen = len(prompts[i])
        assert r.input_ids[i, r.prompt_len - plen : r.prompt_len].tolist() == prompts[i]
        assert r.attention_mask[i, : r.prompt_len].tolist() == [0] * (r.prompt_len - plen) + [1] * plen
    assert r.finished[0] and r.response_mask[0].sum() == 4
    assert r.prompt_len == max(len(p) for p in prompts)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_behaviour_logp_equals_full_recomputation(policy, tok, prompts, temperature):
    engine = make_engine(policy, "fp32")
    g = torch.Generator().manual_seed(1)
    r = generate(engine, prompts, n_samples=3, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, temperature=temperature, generator=g)
    assert r.input_ids.shape[0] == 12 and r.group_index.tolist() == [i for i in range(4) for _ in range(3)]
    with torch.no_grad():
        logp = sequence_logprobs(policy, r.input_ids, r.attention_mask, response_start=r.prompt_len,
                                 temperature=temperature)
    diff = (logp - r.behaviour_logp)[r.response_mask].abs()
    assert diff.max() < 1e-4, diff.max()
    assert r.behaviour_logp[r.response_mask].min() < -0.5  # real sampling, not near-deterministic


def _reference_truncated_logp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """Plain-Python fp64 top-k then top-p, renormalized, for one row."""
    z = [x / temperature for x in logits.double().tolist()]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order if top_k == 0 else [i for i in order if z[i] >= z[order[top_k - 1]]])
    m = max(z[i] for i in keep)
    probs = {i: math.exp(z[i] - m) for i in keep}
    total = sum(probs.values())
    probs = {i: p / total for i, p in probs.items()}
    if top_p < 1.0:
        kept, mass = set(), 0.0
        for i in sorted(probs, key=lambda i: -probs[i]):
            if mass >= top_p:
                break
            kept.add(i)
            mass += probs[i]
        total = sum(probs[i] for i in kept)
        probs = {i: probs[i] / total for i in kept}
    return [math.log(probs[i]) if i in probs else -math.inf for i in range(len(z))]


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (8, 0.7)])
def test_truncated_behaviour_logp_is_renormalized_distribution(policy, tok, prompts, top_k, top_p):
    temperature = 0.8
    engine = make_engine(policy, "fp32")
    g = torch.Generator().manual_seed(2)
    r = generate(engine, prompts, n_samples=2, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
    checked = 0
    for i in range(r.input_ids.shape[0]):
        row = r.input_ids[i][r.attention_mask[i].bool()]
        plen = int(r.attention_mask[i, : r.prompt_len].sum())
        with torch.no_grad():
            logits = policy(row[None]).logits[0]  # unpadded, no cache: independent of the engine
        for t in range(int(r.response_mask[i].sum())):
            ref = _reference_truncated_logp(logits[plen - 1 + t], temperature, top_k, top_p)
            token = int(r.response_ids[i, t])
            assert ref[token] > -math.inf, "sampled a token outside the truncated support"
            assert r.behaviour_logp[i, t].item() == pytest.approx(ref[token], abs=1e-4)
            checked += 1
    assert checked >= 12


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 1.0, 0.7), (4, 1.0, 1.0), (0, 0.9, 1.3), (6, 0.5, 0.8)])
def test_sampling_logprobs_matches_transformers_warpers(top_k, top_p, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g) * 3
    ours = sampling_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    z = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        z = TopKLogitsWarper(top_k)(None, z)
    if top_p < 1:
        z = TopPLogitsWarper(top_p)(None, z)
    ref = torch.log_softmax(z, -1)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-6)


def test_seeded_reproducibility(policy, tok, prompts):
    engine = make_engine(policy, "fp32")
    kw = dict(n_samples=4, max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate(engine, prompts, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(engine, prompts, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(engine, prompts, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.behaviour_logp, b.behaviour_logp)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_prefill_once_per_prompt_and_finished_rows_leave_the_batch(policy, tok, prompts):
    engine = make_engine(policy, "fp32")
    free = hf_greedy(policy, prompts, tok.pad_token_id, eos=None, max_new=12)
    eos = int(free[0, 2])
    batch_sizes = []
    hook = engine.model.model.embed_tokens.register_forward_hook(lambda m, i, o: batch_sizes.append(tuple(i[0].shape)))
    try:
        r = generate(engine, prompts, n_samples=3, max_new_tokens=12, eos_token_id=eos,
                     pad_token_id=tok.pad_token_id, greedy=True)
    finally:
        hook.remove()
    assert batch_sizes[0] == (len(prompts), max(len(p) for p in prompts))  # one prefill row per prompt
    decode = [b[0] for b in batch_sizes[1:]]
    assert all(s[1] == 1 for s in batch_sizes[1:])
    # Decode call j feeds every row's token j: exactly the rows whose response is longer than j+1.
    lengths = r.response_mask.sum(-1).tolist()
    width = r.response_ids.shape[1]
    assert decode == [sum(n > j + 1 for n in lengths) for j in range(width - 1)]
    assert r.finished[:3].all() and lengths[:3] == [3, 3, 3]  # greedy: prompt 0's samples stop at step 3
    assert decode[-1] < decode[0]


def test_engine_owns_its_weights_and_sync(policy, tok, prompts):
    engine = make_engine(policy, "fp8_e4m3", weights_step=0)
    assert engine.model is not policy
    head = engine.model.lm_head.weight
    assert not head.requires_grad and not torch.equal(head, policy.lm_head.weight)
    trained = make_engine(policy, "fp32").model  # a stand-in "trainer" copy we can modify
    with torch.no_grad():
        trained.lm_head.weight.add_(0.5)
    before = head.clone()
    sync_weights(engine, trained, step=7)
    assert engine.weights_step == 7
    from drpo.models import fp8_fake_quantize

    torch.testing.assert_close(engine.model.lm_head.weight,
                               fp8_fake_quantize(trained.lm_head.weight, torch.float8_e4m3fn), rtol=0, atol=0)
    assert not torch.equal(before, engine.model.lm_head.weight)
    r = generate(engine, prompts[:1], n_samples=1, max_new_tokens=2, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert r.weights_step == 7
    bf = make_engine(policy, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf.model.parameters())
    sync_weights(bf, trained, step=1)
    torch.testing.assert_close(bf.model.lm_head.weight, trained.lm_head.weight.bfloat16(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="step"):
        sync_weights(bf, trained, step=-1)
    with pytest.raises(ValueError, match="precision"):
        make_engine(policy, "int8")


def mismatch(policy, engine, prompts, tok, seed=0, **kw):
    """Mean |behaviour logp - fp32 train recomputation| over response tokens."""
    r = generate(engine, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 generator=torch.Generator().manual_seed(seed), **kw)
    with torch.no_grad():
        logp = sequence_logprobs(policy, r.input_ids, r.attention_mask, response_start=r.prompt_len)
    return (logp - r.behaviour_logp)[r.response_mask].abs().mean().item()


def test_precision_mismatch_ordering_on_tiny_model(policy, tok, prompts):
    m = {p: mismatch(policy, make_engine(policy, p), prompts, tok, n_samples=8, max_new_tokens=16)
         for p in ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2")}
    assert m["fp32"] < 1e-5
    assert m["fp32"] < m["bf16"] < m["fp8_e4m3"] < m["fp8_e5m2"], m


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[]]), r"prompts\[0\]"),
        (dict(prompts=[[1, 2, 10_000]]), "10000"),
        (dict(n_samples=0), "n_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(eos_token_id=None), "eos_token_id"),
    ],
)
def test_generate_bad_inputs(policy, tok, kwargs, match):
    engine = make_engine(policy, "fp32")
    args = dict(prompts=[[1, 5, 6]], n_samples=1, max_new_tokens=3, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(engine, args.pop("prompts"), **args)


def test_num_threads_is_scoped_and_does_not_change_samples(policy, tok, prompts):
    before = torch.get_num_threads()
    kw = dict(n_samples=2, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate(make_engine(policy, "fp32"), prompts, generator=torch.Generator().manual_seed(3), **kw)
    seen = []
    engine = make_engine(policy, "fp32", num_threads=1)
    hook = engine.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    b = generate(engine, prompts, generator=torch.Generator().manual_seed(3), **kw)
    hook.remove()
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert torch.equal(a.input_ids, b.input_ids)
    torch.testing.assert_close(a.behaviour_logp, b.behaviour_logp, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_threads"):
        make_engine(policy, "fp32", num_threads=0)


def test_precision_mismatch_cli(capsys):
    from drpo.cli import main

    assert main(["mismatch", "--policy", "tiny", "--precisions", "fp32,fp8_e4m3", "--n-samples", "1", "--max-new-tokens", "4",
                 "--threads", "1"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"fp32", "fp8_e4m3"}
    mean = 3  # columns: precision, tail share, resp len, mean|log r|, ...
    assert float(rows["fp32"][mean]) < 1e-5 < float(rows["fp8_e4m3"][mean])
    with pytest.raises(SystemExit):
        main(["mismatch", "--precisions", "fp16"])


def test_rollout_depends_on_models_only():
    # The engine is a model-side component: importing it must not pull in the objectives, the
    # trainer or the fused-loss module (the mismatch tool, which joins engine and trainer
    # forward, lives in train/).
    import subprocess
    import sys

    code = ("import sys, drpo.rollout; "
            "print(sorted(m for m in sys.modules if m.startswith(('drpo.objectives', 'drpo.train', 'drpo.logprobs', "
            "'drpo.study', 'drpo.tasks', 'drpo.rewards'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
