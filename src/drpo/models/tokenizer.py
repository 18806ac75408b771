"""A character-level tokenizer for the tiny default policy: a real Hugging Face fast
tokenizer (the `tokenizers` library), so it saves, loads and pads like any other."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
# Printable ASCII (letters, digits, punctuation, space) plus newline and tab.
CHARS = tuple(sorted(set(string.printable) - set("\r\x0b\x0c")))


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARS, ids 0-2 for <pad> <bos> <eos>. Encoding adds <bos>
    in front (add_special_tokens=False leaves it out); characters outside CHARS raise."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Every character is its own pre-token ([\s\S] also matches newlines).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
    )
    tok.model_max_length = 4096
    return tok
