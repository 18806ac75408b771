"""The sampling engine: its own weights copy and precision, weight sync, batched KV-cache
generation with behaviour log-probs of the distribution actually sampled from."""

from drpo.rollout.engine import Rollout, RolloutEngine, generate, left_pad, make_engine, sync_weights
from drpo.rollout.sampling import SamplingParams, check_sampling_params, sample_tokens, sampling_logprobs

__all__ = ["Rollout", "RolloutEngine", "SamplingParams", "check_sampling_params", "generate", "left_pad",
           "make_engine", "sample_tokens", "sampling_logprobs", "sync_weights"]
