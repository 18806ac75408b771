"""A randomly initialised Qwen2-shaped policy as a local Hugging Face directory, for `drpo train
--model DIR` and TRL on a machine with no hub access: Qwen2-0.5B's shape by default (hidden 896,
24 layers, 14 query / 2 key-value heads, MLP 4864, tied embeddings, vocabulary 151,936).
Its tokenizer is drpo's character tokenizer (every character of the built-in tasks, the same
ids) padded with filler tokens up to the vocabulary size, so the LM head has the real width
and any sampled id decodes. Only speed and memory mean anything with it, not learning.

    python scripts/gpu/qwen2_policy.py OUT_DIR [--hidden 896 --layers 24 ...] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from drpo.models.tokenizer import make_char_tokenizer

QWEN2_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151_936)


def save_padded_char_tokenizer(out: Path, vocab_size: int):
    """drpo's char tokenizer (same ids, same encoding), saved in `out` with filler tokens up
    to vocab_size added to its vocabulary; returns it loaded back from there."""
    make_char_tokenizer().save_pretrained(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be >= {len(vocab)}, got {vocab_size}")
    vocab.update({f"<|f{i}|>": i for i in range(len(vocab), vocab_size)})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def build(out: Path, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
          device: str = "cpu", seed: int = 0) -> dict:
    tok = save_padded_char_tokenizer(out, vocab)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 0.5B parameters on a GPU takes no time
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)  # bf16 on disk: half the bytes; drpo loads it as fp32
    return {"dir": str(out), "parameters": params, "hidden": hidden, "layers": layers, "heads": heads,
            "kv_heads": kv_heads, "intermediate": intermediate, "vocab": vocab}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    for key, value in QWEN2_05B.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    p.add_argument("--device", default="cpu", help="where the weights are initialised")
    args = p.parse_args(argv)
    info = build(args.out, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab,
                 device=args.device)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
