"""Char tokenizer, tiny model, policy loading, fp8/bf16 precision emulation."""

from __future__ import annotations

import copy
import string

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from drpo.models import (
    PRECISIONS,
    build_tiny_model,
    encode_prompt,
    fake_quantize_weights_,
    format_prompt,
    fp8_fake_quantize,
    load_policy,
    make_char_tokenizer,
    quantized_forward,
)

# ----------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_one_token_per_char_and_round_trip(tmp_path):
    tok = make_char_tokenizer()
    text = "Compute 123 + 45 =\n\t~!{}"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    # Every printable ASCII char (and newline/tab) has its own id.
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    char_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chars]
    assert all(len(i) == 1 for i in char_ids) and len({i[0] for i in char_ids}) == len(chars)
    assert len(tok) == len(chars) + 3
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(text)["input_ids"] == ids
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id


def test_char_tokenizer_rejects_unknown_characters():
    tok = make_char_tokenizer()
    with pytest.raises(Exception):
        tok("caf\u00e9")
    with pytest.raises(ValueError, match="caf"):
        encode_prompt(tok, "caf\u00e9")


def test_char_tokenizer_batch_padding_is_left():
    tok = make_char_tokenizer()
    batch = tok(["1+1=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1, 1]


# ----------------------------------------------------------------------------- tiny model


def test_tiny_model_shape_seed_and_errors():
    tok = make_char_tokenizer()
    model = build_tiny_model(tok, seed=3)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < 5e6
    same = build_tiny_model(tok, seed=3)
    other = build_tiny_model(tok, seed=4)
    w = model.lm_head.weight
    assert torch.equal(w, same.lm_head.weight) and not torch.equal(w, other.lm_head.weight)
    # Building does not disturb the global RNG.
    torch.manual_seed(0)
    a = torch.rand(1)
    torch.manual_seed(0)
    build_tiny_model(tok, seed=9)
    assert torch.equal(a, torch.rand(1))
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(tok, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny_model(tok, num_layers=0)


def test_load_policy_tiny_and_local_directory(tmp_path):
    model, tok = load_policy("tiny", seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_policy(str(tmp_path))
    ids = torch.tensor([tok("12+3=")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok("12+3=")["input_ids"] == ids[0].tolist()
    assert format_prompt(tok, "12+3=") == "12+3="  # no chat template: unchanged


@pytest.mark.parametrize("bad", ["no/such/dir", "", 3])
def test_load_policy_bad_names(bad):
    with pytest.raises(ValueError, match="policy"):
        load_policy(bad)


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize(
    "fp8, row, expected",
    [
        # scale = 448 / 448 = 1; 0.3 = 1.2 * 2^-2 rounds to the nearest 3-bit mantissa 1.25 * 2^-2.
        (torch.float8_e4m3fn, [448.0, 0.3, -1.0], [448.0, 0.3125, -1.0]),
        # e4m3 with scale 2: 1.0 / 2 = 0.5 exactly; 0.7 / 2 = 0.35 = 1.4 * 2^-2 -> 1.375 * 2^-2 -> 0.6875.
        (torch.float8_e4m3fn, [896.0, 1.0, 0.7], [896.0, 1.0, 0.6875]),
        # e5m2 max 57344; 0.3 -> 2-bit mantissa: 1.25 * 2^-2.
        (torch.float8_e5m2, [57344.0, 0.3, 3.0], [57344.0, 0.3125, 3.0]),
    ],
)
def test_fp8_fake_quantize_hand_values(fp8, row, expected):
    w = torch.tensor([row, [0.0, 0.0, 0.0]])
    q = fp8_fake_quantize(w, fp8)
    assert q[0].tolist() == expected
    assert q[1].tolist() == [0.0, 0.0, 0.0]  # all-zero row stays zero (no 0/0)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_fake_quantize_equals_torch_float8_round_trip(fp8):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    q = fp8_fake_quantize(w, fp8)
    fmax = torch.finfo(fp8).max
    for r in range(w.shape[0]):
        scale = w[r].abs().max().item() / fmax  # per output channel
        expected = (w[r] / scale).to(fp8).to(torch.float32) * scale
        torch.testing.assert_close(q[r], expected, rtol=1e-6, atol=0)
        # Values divided by the scale are exactly representable in the format.
        unscaled = q[r] / scale
        torch.testing.assert_close(unscaled.to(fp8).float(), unscaled, rtol=1e-6, atol=0)
    assert (q - w).abs().max() > 0  # it actually quantized


def test_fake_quantize_weights_in_place_by_precision():
    tok = make_char_tokenizer()
    base = build_tiny_model(tok, num_layers=1)
    for precision in PRECISIONS:
        model = copy.deepcopy(base)
        fake_quantize_weights_(model, precision)
        names = dict(model.named_parameters())
        ref = dict(base.named_parameters())
        if precision == "bf16":
            assert all(p.dtype == torch.bfloat16 for p in names.values())
            continue
        # fp8_e2e: the fp8 weights held in bf16, for the engine kernel's bf16 compute.
        dtype = torch.bfloat16 if precision == "fp8_e2e" else torch.float32
        assert all(p.dtype == dtype for p in names.values())
        for name, p in names.items():
            if precision == "fp32" or "norm" in name:
                assert torch.equal(p, ref[name].to(dtype)), name
            else:
                fp8 = torch.float8_e5m2 if precision == "fp8_e5m2" else torch.float8_e4m3fn
                expected = fp8_fake_quantize(ref[name].detach(), fp8).to(dtype)
                torch.testing.assert_close(p, expected, rtol=0, atol=0)
                assert not torch.equal(p, ref[name]), name
    with pytest.raises(ValueError, match="fp16"):
        fake_quantize_weights_(copy.deepcopy(base), "fp16")


def _tied_llama():
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_forward_straight_through(tied):
    model = _tied_llama() if tied else build_tiny_model(make_char_tokenizer(), num_layers=2)
    master = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 40, (2, 9))
    # Reference: a copy whose weights ARE the quantized values, differentiated normally.
    quant = fake_quantize_weights_(copy.deepcopy(model), "fp8_e4m3")
    ref_loss = quant(ids).logits.logsumexp(-1).mean()
    ref_loss.backward()
    with quantized_forward(model, "fp8_e2e"):
        loss = model(ids).logits.logsumexp(-1).mean()
        head = model.get_output_embeddings().weight
        torch.testing.assert_close(head, fp8_fake_quantize(master["lm_head.weight" if not tied else
                                                                  "model.embed_tokens.weight"], torch.float8_e4m3fn))
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    ref_grads = dict(quant.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), master[name]), name  # master weights untouched
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7)
    assert set(dict(model.named_parameters())) == set(master)  # parametrizations removed
    assert not any("parametrizations" in k for k in model.state_dict())


def test_quantized_forward_other_precisions_are_no_ops():
    model = build_tiny_model(make_char_tokenizer(), num_layers=1)
    ids = torch.randint(3, 40, (1, 5))
    with torch.no_grad():
        ref = model(ids).logits
        for precision in ("fp32", "bf16", "fp8_e4m3"):
            with quantized_forward(model, precision):
                assert torch.equal(model(ids).logits, ref)
    with pytest.raises(ValueError, match="precision"):
        with quantized_forward(model, "int4"):
            pass


def test_sequence_logprobs_inside_quantized_forward_sees_fp8_weights():
    # fp8_e2e: the trainer's recomputation must use the same fake-quantized weights as an
    # fp8_e4m3 engine, including the LM head read directly by sequence_logprobs.
    from drpo.logprobs import sequence_logprobs

    model = build_tiny_model(make_char_tokenizer(), num_layers=2)
    quant = fake_quantize_weights_(copy.deepcopy(model), "fp8_e4m3")
    ids = torch.randint(3, 90, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = sequence_logprobs(quant, ids, mask, response_start=4)
        plain = sequence_logprobs(model, ids, mask, response_start=4)
        with quantized_forward(model, "fp8_e2e"):
            inside = sequence_logprobs(model, ids, mask, response_start=4)
    torch.testing.assert_close(inside, ref, rtol=1e-6, atol=1e-6)
    assert (inside - plain).abs().max() > 1e-4  # quantization actually changed the log-probs
