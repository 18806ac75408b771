"""The distribution the engine samples from: temperature, then top-k, then top-p, renormalized
(the order of Hugging Face's logits processors). Its log-probs are the behaviour log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How the engine samples: `n_samples` completions per prompt, each ending at its first
    `eos_token_id` or after `max_new_tokens`, from the temperature/top-k/top-p distribution
    (`sampling_logprobs`), or its argmax with `greedy` (evaluation). Checked when built, so
    a run binds them once."""

    n_samples: int
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self) -> None:
        for name, low in (("n_samples", 1), ("max_new_tokens", 1), ("eos_token_id", 0), ("pad_token_id", 0)):
            check_int(name, getattr(self, name), low)
        check_sampling_params(self.temperature, self.top_p, self.top_k)


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")


def check_sampling_params(temperature: float, top_p: float, top_k: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"`top_k` must be an int >= 0 (0 = off), got {top_k!r}")


def sampling_logprobs(logits: Tensor, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> Tensor:
    """log of the sampling distribution over the vocabulary, fp32 [..., V]; tokens removed
    by top-k/top-p get -inf.

    top-k keeps every token whose logit is >= the k-th largest (ties kept); top-p keeps the
    smallest prefix of the probability-sorted tokens whose mass reaches top_p (the most
    likely token always stays), computed on the top-k renormalized distribution."""
    z = logits.float() / temperature
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # Mass strictly before each token; a token is kept while that mass is < top_p.
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def sample_tokens(logprobs: Tensor, *, greedy: bool, generator: torch.Generator | None) -> Tensor:
    """One token id per row [N] from log-probs [N, V]."""
    if greedy:
        return logprobs.argmax(-1)
    return torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
