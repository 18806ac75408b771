"""Policies (tiny default, SmolLM2 from GGUF, local HF directories), the char tokenizer, and
precision emulation for the rollout engine.

    model, tokenizer = load_policy("tiny")            # or "smollm2", or a local directory
    fake_quantize_weights_(engine_copy, "fp8_e4m3")    # engine-side precision
    with quantized_forward(policy, "fp8_e2e"): ...     # fp8 training forward (STE)
"""

from drpo.models.loading import build_tiny_model, encode_prompt, format_prompt, load_policy, smollm2_gguf_path
from drpo.models.precision import (
    PRECISIONS, check_precision, fake_quantize_weights_, fp8_fake_quantize, quantized_forward,
)
from drpo.models.tokenizer import make_char_tokenizer

__all__ = [
    "PRECISIONS", "build_tiny_model", "check_precision", "encode_prompt", "fake_quantize_weights_",
    "format_prompt", "fp8_fake_quantize", "load_policy", "make_char_tokenizer", "quantized_forward",
    "smollm2_gguf_path",
]
