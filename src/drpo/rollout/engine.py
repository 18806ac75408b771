"""The rollout engine: its own copy of the policy weights in its own precision, synced from
the trainer every k steps, sampling groups of completions with a KV cache.

    engine = make_engine(policy, "bf16")
    rollout = generate(engine, prompts, n_samples=8, max_new_tokens=32, eos_token_id=..., pad_token_id=...)
    # or, with the parameters bound once: generate(engine, prompts, SamplingParams(...), generator=g)
    ...  # optimizer steps on `policy`
    sync_weights(engine, policy, step)
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import transformers.modeling_outputs
from torch import Tensor, nn

from drpo.models.logprobs import position_ids_from_mask
from drpo.models.precision import check_precision, fake_quantize_weights_
from drpo.rollout.sampling import SamplingParams, check_int, sample_tokens, sampling_logprobs

# The KV cache's name in a causal LM's forward and output: `cache` since transformers 5.x
# deprecated `past_key_values` (a warning every run), `past_key_values` before.
CACHE_KWARG = "cache" if hasattr(transformers.modeling_outputs.CausalLMOutputWithPast, "cache") else "past_key_values"


@dataclass
class RolloutEngine:
    model: nn.Module  # the engine's own weights, in `precision`
    precision: str
    weights_step: int = 0  # trainer step whose weights the engine holds
    # torch intra-op threads while generating (None: leave torch's setting). Decoding is
    # thousands of small ops; on a busy 2-core machine 1 thread can be >10x faster than 2.
    num_threads: int | None = None


@dataclass
class Rollout:
    """N = len(prompts) * n_samples rows; rows i*n..(i+1)*n-1 are prompt i's samples.

    input_ids       [N, P+R]  left-padded prompt (length P), then the response right-padded to R
    attention_mask  [N, P+R]  1 on prompt and response tokens (EOS included), 0 on padding
    response_mask   [N, R]    bool, response tokens incl. EOS, excluding padding after it
    behaviour_logp  [N, R]    fp32 log-prob of each sampled token under the distribution sampled
                              from (temperature, top-k, top-p, renormalized); 0 on padding
    prompt_len      P
    group_index     [N]       long, the prompt index of each row
    finished        [N]       bool, the response ended with EOS (else it hit max_new_tokens)
    weights_step    the engine's weights_step when it sampled (policy staleness)

    R is the longest response in the batch (<= max_new_tokens).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_logp: Tensor
    prompt_len: int
    group_index: Tensor
    finished: Tensor
    weights_step: int = 0

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)


def make_engine(
    policy: nn.Module, precision: str, *, weights_step: int = 0, num_threads: int | None = None
) -> RolloutEngine:
    """A rollout engine holding a deep copy of `policy` with `precision` applied, in eval
    mode and without gradients (the policy itself is not touched)."""
    check_precision(precision)
    if num_threads is not None:
        check_int("num_threads", num_threads, 1)
    model = copy.deepcopy(policy)
    fake_quantize_weights_(model, precision)
    model.eval().requires_grad_(False)
    return RolloutEngine(model=model, precision=precision, weights_step=weights_step, num_threads=num_threads)


@contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count set to n inside the block, restored after."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (a tied one under each of its names)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    return tensors | dict(model.named_buffers(remove_duplicate=False))


@torch.no_grad()
def sync_weights(engine: RolloutEngine, policy: nn.Module, step: int) -> None:
    """Copy the trainer's current weights into the engine and re-apply its precision.
    Call it outside `quantized_forward` (inside it the policy's weights are parametrized)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an int >= 0, got {step!r}")
    src, dst = _tensors(policy), _tensors(engine.model)
    if src.keys() != dst.keys():
        missing = sorted(dst.keys() - src.keys())[:3]
        extra = sorted(src.keys() - dst.keys())[:3]
        raise ValueError(
            f"policy and engine have different tensors (missing in policy: {missing}, unexpected: {extra}); "
            "was the policy inside quantized_forward?"
        )
    # Back to fp32 first, so low-precision engines re-quantize from the exact master weights
    # (copying into bf16 tensors would round before the fp8 quantization).
    engine.model.float()
    for name, tensor in _tensors(engine.model).items():
        if src[name].shape != tensor.shape:
            raise ValueError(f"sync_weights: {name!r} has shape {tuple(src[name].shape)} in the policy, "
                             f"{tuple(tensor.shape)} in the engine")
        tensor.copy_(src[name])
    fake_quantize_weights_(engine.model, engine.precision)
    engine.weights_step = step


def _check_prompts(prompts, vocab_size: int) -> None:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"`prompts` must be a non-empty list of token-id lists, got {type(prompts).__name__} "
                         f"of length {len(prompts) if hasattr(prompts, '__len__') else '?'}")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"`prompts[{i}]` must be a non-empty list of token ids, got {p!r}")
        for tok in p:
            if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab_size:
                raise ValueError(f"`prompts[{i}]` holds {tok!r}, not a token id in [0, {vocab_size})")


def left_pad(prompts: list[list[int]], pad_token_id: int, device=None) -> tuple[Tensor, Tensor]:
    """[B, P] ids and attention mask, prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()  # not inference_mode: the Rollout tensors must be usable in autograd later
def generate(
    engine: RolloutEngine,
    prompts: list[list[int]],
    sampling: SamplingParams | None = None,
    *,
    generator: torch.Generator | None = None,
    **params,
) -> Rollout:
    """Sample completions of every prompt, all in one batch with a KV cache, as `sampling`
    says (or a `SamplingParams` built from the keyword `params`: n_samples, max_new_tokens,
    eos_token_id, pad_token_id, temperature, top_p, top_k, greedy).

    Each prompt is prefilled once and its cache expanded across its samples; rows that
    emitted EOS are dropped from the batch (and the cache) so they cost nothing more; the
    loop ends when every row has finished or after `max_new_tokens`. Sampling draws from
    `generator` only, so a seeded generator reproduces the rollout. With `greedy` the
    argmax token is taken; its behaviour_logp is still its log-prob under the
    temperature/top-k/top-p distribution (greedy decoding is for evaluation). Non-finite
    logits (the weights overflowed) cannot be sampled from: FloatingPointError."""
    _check_prompts(prompts, engine.model.get_output_embeddings().weight.shape[0])
    if sampling is None:
        sampling = SamplingParams(**params)
    elif params:
        raise TypeError(f"pass the sampling parameters as `sampling` or as keywords, not both (got {sorted(params)})")
    with _threads(engine.num_threads):
        return _generate(engine, prompts, sampling, generator)


def _generate(engine: RolloutEngine, prompts, s: SamplingParams, generator) -> Rollout:
    model = engine.model
    device = model.get_output_embeddings().weight.device
    prompt_ids, prompt_mask = left_pad(prompts, s.pad_token_id, device)
    n_rows = len(prompts) * s.n_samples
    logits, cache, mask, next_pos = _prefill(model, prompt_ids, prompt_mask, s.n_samples)

    tokens = torch.full((n_rows, s.max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((n_rows, s.max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    active = torch.arange(n_rows, device=device)  # rows still generating, in cache order
    steps = 0
    for t in range(s.max_new_tokens):
        dist = sampling_logprobs(logits, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        try:
            tok = sample_tokens(dist, greedy=s.greedy, generator=generator)
        except RuntimeError as err:  # torch.multinomial refuses NaN/inf probabilities
            if bool(torch.isfinite(logits).all()):
                raise
            raise FloatingPointError(f"non-finite logits at response position {t} from the engine's weights (synced "
                                     f"at step {engine.weights_step}): the policy's numbers overflowed") from err
        tokens[active, t] = tok
        logps[active, t] = dist.gather(-1, tok[:, None]).squeeze(-1)
        steps = t + 1
        done = tok == s.eos_token_id
        finished[active[done]] = True
        if bool(done.all()) or t == s.max_new_tokens - 1:
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = _decode_step(model, tok, mask, next_pos, cache)
        next_pos = next_pos + 1

    return _assemble(prompt_ids, prompt_mask, tokens[:, :steps], logps[:, :steps], finished, s, engine.weights_step)


def _prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, n_samples: int):
    """Run each prompt once, then repeat its cache, last logits and mask for its samples."""
    positions = position_ids_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = getattr(out, CACHE_KWARG)
    if n_samples > 1:
        cache.batch_repeat_interleave(n_samples)
    logits = out.logits[:, -1].float().repeat_interleave(n_samples, dim=0)
    mask = prompt_mask.repeat_interleave(n_samples, dim=0)
    next_pos = positions[:, -1].repeat_interleave(n_samples, dim=0) + 1
    return logits, cache, mask, next_pos


def _decode_step(model, tok: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
    out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=positions[:, None],
                use_cache=True, **{CACHE_KWARG: cache})
    return out.logits[:, -1].float()


def _assemble(prompt_ids, prompt_mask, tokens, logps, finished, s: SamplingParams, step: int) -> Rollout:
    """Masks from the tokens: a response runs up to and including its first EOS."""
    is_eos = tokens == s.eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = ~after_eos
    tokens = tokens.masked_fill(after_eos, s.pad_token_id)
    logps = logps.masked_fill(after_eos, 0.0)
    ids = torch.cat([prompt_ids.repeat_interleave(s.n_samples, dim=0), tokens], dim=1)
    attn = torch.cat([prompt_mask.repeat_interleave(s.n_samples, dim=0), response_mask.long()], dim=1)
    group = torch.arange(prompt_ids.shape[0], device=ids.device).repeat_interleave(s.n_samples)
    return Rollout(input_ids=ids, attention_mask=attn, response_mask=response_mask, behaviour_logp=logps,
                   prompt_len=prompt_ids.shape[1], group_index=group, finished=finished, weights_step=step)
