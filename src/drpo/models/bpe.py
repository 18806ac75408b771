"""A byte-level BPE tokenizer trained locally on a task's own text (the `tokenizers`
library, GPT-2-style pre-tokenization), for the testbed policy: a subword vocabulary of
real size without downloading one. Training is deterministic: the same texts and
vocab_size give the same vocabulary and merges."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from drpo.models.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS

CORPUS_OFFSET = 3 * 10**9  # training-stream indices for the tokenizer corpus (disjoint from RL/SFT)
CORPUS_SIZE = 4000


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <pad> <bos> <eos> at ids 0-2 and at most `vocab_size` tokens
    (fewer if the texts run out of merges). Encoding prepends <bos>, like the char tokenizer."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"`vocab_size` must be an int >= 300 (256 bytes + specials + merges), got {vocab_size!r}")
    if not texts:
        raise ValueError("cannot train a BPE tokenizer on no texts")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  padding_side="left")
    tok.model_max_length = 4096
    return tok


def task_tokenizer(task, vocab_size: int, size: int = CORPUS_SIZE) -> PreTrainedTokenizerFast:
    """BPE trained on `size` prompt + reference texts of `task`'s training stream."""
    texts = []
    for i in range(size):
        ex = task.train_example(CORPUS_OFFSET + i)
        texts.append(f"{ex.prompt}\n{ex.answer}")
    return train_bpe_tokenizer(texts, vocab_size)
