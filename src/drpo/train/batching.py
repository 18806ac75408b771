"""Text <-> token ids for the trainer: prompt encoding (the model's chat template when it
has one), completion decoding, and left-padded prompt + right-padded answer batches."""

from __future__ import annotations

import torch
from torch import Tensor

from drpo.models import encode_prompt
from drpo.tasks import Example


def encode_prompts(tokenizer, examples: list[Example], template: str, *, system: str | None = None) -> list[list[int]]:
    return [encode_prompt(tokenizer, template.format(prompt=ex.prompt), system=system) for ex in examples]


def decode_completions(tokenizer, response_ids: Tensor, response_mask: Tensor) -> list[str]:
    """Text of each sampled response (masked tokens only, special tokens dropped)."""
    return [
        tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
        for ids, mask in zip(response_ids, response_mask.bool())
    ]


def supervised_batch(
    prompts: list[list[int]], answers: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Prompts left-padded to a common length P and answers right-padded, so every answer
    starts at column P (the layout the rollout engine produces).
    Returns input_ids [B, P+R], attention_mask [B, P+R], answer_mask [B, R], P."""
    if not prompts or len(prompts) != len(answers):
        raise ValueError(f"need as many prompts as answers (and at least one), got {len(prompts)} and {len(answers)}")
    p_len = max(len(p) for p in prompts)
    r_len = max(len(a) for a in answers)
    rows, masks, amasks = [], [], []
    for p, a in zip(prompts, answers):
        left, right = p_len - len(p), r_len - len(a)
        rows.append([pad_id] * left + p + a + [pad_id] * right)
        masks.append([0] * left + [1] * (len(p) + len(a)) + [0] * right)
        amasks.append([1] * len(a) + [0] * right)
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(amasks, dtype=torch.bool), p_len
