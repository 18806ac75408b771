"""Chunked log-probs, entropy and the fused policy loss against naive full-logits references
(fp64 and fp32), values and gradients."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo.logprobs import fused_policy_loss, sequence_logprobs, token_logprobs
from drpo.models import build_tiny_model, make_char_tokenizer
from drpo.objectives import AGG_MODES, METHODS, policy_loss


def naive(hidden, weight, targets, temperature=1.0):
    """The textbook computation on full logits (fp64 for references)."""
    logits = hidden @ weight.t() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def close(actual, expected, rtol=1e-5):
    """Relative agreement, elementwise with an absolute floor at rtol * the tensor's scale
    (gradients sum terms of both signs, so tiny entries carry the rounding of big ones)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


def make_case(seed, batch_shape, vocab, hid, dtype=torch.float32, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*batch_shape, hid, generator=g) * scale).to(dtype)
    weight = (torch.randn(vocab, hid, generator=g) / hid**0.5).to(dtype)
    targets = torch.randint(0, vocab, batch_shape, generator=g)
    return hidden, weight, targets


def grads_of(fn, hidden, weight, g_out):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    outs = fn(h, w)
    total = sum((o.double() * g).sum() for o, g in zip(outs, g_out))
    total.backward()
    return [o.detach() for o in outs], h.grad, w.grad


@settings(max_examples=40, deadline=None)
@given(
    batch_shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    vocab=st.integers(2, 70),
    hid=st.integers(1, 12),
    chunk=st.integers(1, 23),
    vocab_chunk=st.integers(1, 80),
    temperature=st.sampled_from([1.0, 0.7, 1.3, 0.25]),
    with_entropy=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunked_matches_fp64_naive_values_and_grads(
    batch_shape, vocab, hid, chunk, vocab_chunk, temperature, with_entropy, seed
):
    hidden, weight, targets = make_case(seed, batch_shape, vocab, hid)
    g = torch.Generator().manual_seed(seed + 1)
    g_out = [torch.randn(batch_shape, generator=g, dtype=torch.float64) for _ in range(2)]
    if not with_entropy:
        g_out = g_out[:1]

    def ours(h, w):
        out = token_logprobs(h, w, targets, temperature=temperature, chunk_size=chunk, with_entropy=with_entropy,
                             vocab_chunk_size=vocab_chunk)
        return out if with_entropy else (out,)

    def ref(h, w):
        lp, ent = naive(h.double(), w.double(), targets, temperature)
        return (lp, ent) if with_entropy else (lp,)

    outs, gh, gw = grads_of(ours, hidden, weight, g_out)
    routs, rgh, rgw = grads_of(ref, hidden, weight, g_out)
    for o, r in zip(outs, routs):
        assert o.dtype == torch.float32 and o.shape == batch_shape
        close(o, r)
    close(gh, rgh)
    close(gw, rgw)


@pytest.mark.parametrize("vocab_chunk", [300, 1000, 4096])
def test_matches_fp32_naive_at_realistic_size_chunk_not_dividing(vocab_chunk):
    # 300 tokens, chunk 128 (leaves a partial chunk), vocab 1000 in tiles of 300 (partial
    # last tile), one tile, or a tile larger than the vocabulary; temperature 0.8, entropy on.
    hidden, weight, targets = make_case(3, (3, 100), 1000, 64)
    g = torch.Generator().manual_seed(9)
    g_out = [torch.randn(3, 100, generator=g), torch.randn(3, 100, generator=g)]
    outs, gh, gw = grads_of(
        lambda h, w: token_logprobs(h, w, targets, temperature=0.8, chunk_size=128, with_entropy=True,
                                    vocab_chunk_size=vocab_chunk),
        hidden, weight, g_out,
    )
    routs, rgh, rgw = grads_of(lambda h, w: naive(h, w, targets, 0.8), hidden, weight, g_out)
    for o, r in zip(outs, routs):
        close(o, r)
    close(gh, rgh)
    close(gw, rgw)


def test_entropy_of_uniform_and_one_hot_by_hand():
    # Zero weights give uniform logits: logp = -log V, entropy = log V, for any hidden.
    vocab = 7
    hidden = torch.randn(5, 3)
    weight = torch.zeros(vocab, 3)
    logp, ent = token_logprobs(hidden, weight, torch.arange(5), with_entropy=True, chunk_size=2)
    expected = torch.log(torch.tensor(float(vocab)))
    torch.testing.assert_close(logp, -expected.expand(5))
    torch.testing.assert_close(ent, expected.expand(5))
    # A huge logit gap: the target token gets logp ~ 0 and entropy ~ 0.
    weight = torch.zeros(vocab, 1)
    weight[2, 0] = 100.0
    logp, ent = token_logprobs(torch.ones(1, 1), weight, torch.tensor([2]), with_entropy=True)
    assert abs(logp.item()) < 1e-30 + 1e-6 and ent.item() < 1e-6


def test_bf16_inputs_match_bf16_head_then_fp32_softmax():
    hidden, weight, targets = make_case(5, (40,), 300, 32, dtype=torch.bfloat16)
    ours = token_logprobs(hidden, weight, targets, chunk_size=16, vocab_chunk_size=64)
    ref = torch.log_softmax((hidden @ weight.t()).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    token_logprobs(h, w, targets, chunk_size=16, vocab_chunk_size=64).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # Against the fp64 gradient of the same bf16 values: bf16 rounding only.
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    naive(h64, w64, targets)[0].sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-2, atol=2e-2)


def test_no_grad_on_one_input():
    hidden, weight, targets = make_case(1, (10,), 20, 4)
    h = hidden.clone().requires_grad_(True)
    token_logprobs(h, weight, targets, chunk_size=3).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    naive(h_ref, weight, targets)[0].sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 4), targets=torch.zeros(4, dtype=torch.long)), "hidden size"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.zeros(3, dtype=torch.long)), "targets"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.zeros(4)), "integer"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.full((4,), 5)), "token id 5"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3), targets=torch.full((4,), -1)), "token id -1"),
        (dict(hidden=torch.randn(4, 3), weight=torch.randn(5, 3, 1), targets=torch.zeros(4, dtype=torch.long)), "weight"),
        (dict(hidden=torch.zeros(4, 3, dtype=torch.long), weight=torch.randn(5, 3), targets=torch.zeros(4, dtype=torch.long)), "hidden"),
    ],
)
def test_bad_inputs_raise_naming_the_field(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs(**kwargs)


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=0.0), dict(temperature=-1.0), dict(chunk_size=0), dict(chunk_size=2.5), dict(vocab_chunk_size=0)],
)
def test_bad_options_raise(bad):
    hidden, weight, targets = make_case(0, (4,), 5, 3)
    with pytest.raises(ValueError, match=next(iter(bad))):
        token_logprobs(hidden, weight, targets, **bad)


@pytest.mark.parametrize("field", ["hidden", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(field, value):
    hidden, weight, targets = make_case(0, (4,), 5, 3)
    args = {"hidden": hidden, "weight": weight}
    args[field][1, 2] = value
    with pytest.raises(ValueError, match=rf"`{field}` has a non-finite value .* at index \(1, 2\)"):
        token_logprobs(args["hidden"], args["weight"], targets)


def test_empty_token_set_gives_empty_output():
    logp = token_logprobs(torch.randn(0, 3), torch.randn(5, 3), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,)


# ----------------------------------------------------------------------------- fused loss


def fused_case(seed, batch=3, seq=11, vocab=37, hid=8):
    hidden, weight, targets = make_case(seed, (batch, seq), vocab, hid)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        # Behaviour log-probs near the current ones (ratios around 1) with some far off.
        cur = naive(hidden, weight, targets)[0]
        old = (cur + 0.3 * torch.randn(batch, seq, generator=g)).clamp(max=-1e-3)
    adv = torch.randn(batch, generator=g)
    adv[0] = 0.0
    mask = torch.rand(batch, seq, generator=g) > 0.25
    mask[-1] = False  # a sequence with no response token
    mask[0, 0] = True
    return hidden, weight, targets, old, adv, mask


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("vocab_chunk", [8, 8192])  # 7*8//37 = 1-token blocks, or 7-token blocks
def test_fused_policy_loss_equals_policy_loss_on_naive_logprobs(method, agg, vocab_chunk):
    # a fixed case per parameter set (str hashes are salted per process, so hash() would draw a
    # new case on every run)
    hidden, weight, targets, old, adv, mask = fused_case(zlib.crc32(f"{method}/{agg}".encode()) % 1000)
    params = {"delta": 0.2} if method in ("drpo", "mask_drpo") else {}
    temperature = 0.9

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, metrics = fused_policy_loss(
        method, h1, w1, targets, old, adv, mask, temperature=temperature, chunk_size=7, agg=agg,
        vocab_chunk_size=vocab_chunk, **params
    )
    loss.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = naive(h2, w2, targets, temperature)[0]
    ref_loss, ref_metrics = policy_loss(method, logp, old, adv, mask, agg=agg, **params)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    # fp32 sums in another order (vocab and token chunks): errors scale with the largest entry,
    # which SPO's 1/mu weights make large, so the tolerance does too
    for got, ref in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * max(1.0, ref.abs().max().item()))
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-5), key


def test_fused_policy_loss_scaled_backward_and_no_grad_mode():
    hidden, weight, targets, old, adv, mask = fused_case(4)
    h1 = hidden.clone().requires_grad_(True)
    loss, _ = fused_policy_loss("grpo", h1, weight, targets, old, adv, mask, chunk_size=5)
    (3.0 * loss).backward()
    h2 = hidden.clone().requires_grad_(True)
    ref, _ = policy_loss("grpo", naive(h2, weight, targets)[0], old, adv, mask)
    (3.0 * ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss_ng, _ = fused_policy_loss("grpo", h1, weight, targets, old, adv, mask, chunk_size=5)
    torch.testing.assert_close(loss_ng, ref.detach(), rtol=1e-5, atol=1e-6)


def test_fused_policy_loss_bad_inputs():
    hidden, weight, targets, old, adv, mask = fused_case(5)
    with pytest.raises(ValueError, match="unknown method"):
        fused_policy_loss("nope", hidden, weight, targets, old, adv, mask)
    with pytest.raises(ValueError, match="old_logp"):
        fused_policy_loss("drpo", hidden, weight, targets, old[:, :-1], adv, mask)
    bad_old = old.clone()
    bad_old[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fused_policy_loss("drpo", hidden, weight, targets, bad_old, adv, mask)
    with pytest.raises(ValueError, match="unknown parameter"):
        fused_policy_loss("drpo", hidden, weight, targets, old, adv, mask, eps=0.1)


# ----------------------------------------------------------------------------- models


def test_sequence_logprobs_matches_model_logits_with_left_padding():
    tok = make_char_tokenizer()
    model = build_tiny_model(tok, seed=1)
    rows = ["12+34=46", "7+8=15xy"]
    ids = [tok(r)["input_ids"] for r in rows]
    # Left-pad row 1 by 3 positions; response = last 4 tokens of each row.
    width = max(len(i) for i in ids) + 3
    input_ids = torch.full((2, width), tok.pad_token_id)
    attn = torch.zeros((2, width), dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, width - len(row) :] = torch.tensor(row)
        attn[r, width - len(row) :] = 1
    start = width - 4
    logp, ent = sequence_logprobs(model, input_ids, attn, response_start=start, temperature=0.7, with_entropy=True)
    assert logp.shape == (2, 4) and ent.shape == (2, 4)
    # Reference: each row alone, unpadded, through the full model (its own lm_head).
    for r, row in enumerate(ids):
        logits = model(torch.tensor([row])).logits[0].double() / 0.7
        lp_all = torch.log_softmax(logits, -1)
        ref = lp_all[-5:-1].gather(-1, torch.tensor(row[-4:])[:, None]).squeeze(-1)
        ref_ent = -(lp_all[-5:-1].exp() * lp_all[-5:-1]).sum(-1)
        torch.testing.assert_close(logp[r].double(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent[r].double(), ref_ent, rtol=1e-5, atol=1e-5)
    # Gradients reach the LM head and the body.
    model.zero_grad()
    logp.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_sequence_logprobs_bad_arguments():
    tok = make_char_tokenizer()
    model = build_tiny_model(tok, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=16)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="response_start"):
        sequence_logprobs(model, ids, torch.ones_like(ids), response_start=5)
    with pytest.raises(ValueError, match="attention_mask"):
        sequence_logprobs(model, ids, torch.ones(2, 4), response_start=2)


def _largest_op_allocation(fn) -> int:
    """Bytes allocated by the single most allocating aten op while fn runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))


def test_never_materializes_the_full_logits():
    n, vocab, hid = 256, 4096, 16
    full_logits_bytes = n * vocab * 4  # 4 MiB
    tile_bytes = 64 * 512 * 4  # 128 KiB
    hidden, weight, targets = make_case(0, (n,), vocab, hid)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    ours = _largest_op_allocation(
        lambda: token_logprobs(h, w, targets, chunk_size=64, vocab_chunk_size=512, with_entropy=True)[0]
        .sum()
        .backward()
    )
    naive_alloc = _largest_op_allocation(lambda: naive(h, w, targets)[0].sum().backward())
    assert naive_alloc >= full_logits_bytes  # the probe sees the full logits when they exist
    # Nothing bigger than the weight gradient (V x H fp32 = 256 KiB) or a logits tile.
    assert ours <= max(tile_bytes, vocab * hid * 4), ours
