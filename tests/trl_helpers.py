"""What the TRL tests share: a run that takes seconds on a CPU (a 2-layer random Llama over
characters, four arithmetic prompts), its TRL arguments, two rule rewards and the trainer. Imported by the
tests under tests/integrations/trl/, by tests/test_cuda.py and by the torchrun worker."""

from __future__ import annotations

from datasets import Dataset

from drpo.integrations.trl import DRPOConfig, DRPOGRPOTrainer
from drpo.models import build_tiny_model, make_char_tokenizer

PROMPTS = ["12+34=", "5+7=", "40+2=", "9+99="]
# 4 rows per device, 4 generations of 6 tokens, a log row per step, nothing saved or reported.
TINY_ARGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=6,
    learning_rate=3e-2,
    temperature=1.0,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    seed=0,
)

# TRL's dr_grpo normalisation (sum / (B * max_completion_length)) is drpo's
# seq-mean-token-sum-norm with horizon max_completion_length when no row is empty, as here.
METHOD, PARAMS, LOSS_TYPE, AGG = "drpo", {"delta": 0.05}, "dr_grpo", "seq-mean-token-sum-norm"


def tiny_model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)


def tiny_setup(prompts: list[str] = PROMPTS):
    """(tokenizer, model, dataset of `prompts`)."""
    tokenizer = make_char_tokenizer()
    return tokenizer, tiny_model(tokenizer), Dataset.from_list([{"prompt": p} for p in prompts])


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """Rule-based reward: the fraction of completion characters that are digits."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def spread_reward(prompts, completions, **kwargs) -> list[float]:
    """Varies between any two random completions, so groups of random text get advantages."""
    return [(sum(map(ord, text)) % 17) / 17 for text in completions]


def make_config(tmp_path, **overrides) -> DRPOConfig:
    kwargs = dict(
        TINY_ARGS,
        output_dir=str(tmp_path),
        max_steps=2,
        num_iterations=2,  # step 2 reuses step 1's rollout: its anchor is the pre-update policy
        drpo_method=METHOD,
        drpo_params=PARAMS,
        loss_type=LOSS_TYPE,
    )
    kwargs.update(overrides)
    return DRPOConfig(**kwargs)


def tiny_trainer(tmp_path, cls=DRPOGRPOTrainer, **overrides):
    """A `cls` on the tiny run, rewarded by digits, with `make_config(tmp_path, **overrides)`."""
    tokenizer, model, data = tiny_setup()
    return cls(model=model, reward_funcs=digit_reward, args=make_config(tmp_path, **overrides), train_dataset=data,
               processing_class=tokenizer)
