"""The run configuration: one typed, validated tree (pydantic), filled from a YAML file and
`--set key=value` overrides. Unknown keys and bad values stop the run at start with a
message naming the key and the value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drpo.objectives import AGG_MODES, get_method
from drpo.precisions import Precision
from drpo.textfile import NotUTF8Error, read_utf8, split_assignment
from drpo.train.schedule import Schedule

AggMode = Literal[AGG_MODES]  # the names, from drpo.objectives


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = "tiny"  # "tiny" | "smollm2" | a local Hugging Face model directory
    # Sizes of the tiny Llama-style default (ignored for other models).
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(384, gt=0)
    max_position: int = Field(64, gt=0)
    # Tokenizer of the tiny model: "char" (one token per character) or "bpe" (byte-level BPE
    # of at most vocab_size tokens, trained on the task's own text; the testbed's).
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: int = Field(1536, ge=300)
    # System turn for chat-templated models (prompts use the chat template whenever the
    # tokenizer has one, e.g. SmolLM2); None = no system turn.
    system_prompt: str | None = None

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in ("tiny", "smollm2") and not Path(v).is_dir():
            raise ValueError(f"must be 'tiny', 'smollm2' or an existing local model directory, got {v!r}")
        return v

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        return self

    @property
    def is_tiny(self) -> bool:
        """The built-in tiny model: built from this section's sizes and tokenizer, warm-started."""
        return self.name == "tiny"


class WarmstartConfig(_Section):
    enabled: bool = True  # supervised warm start of the tiny default on the built-in task
    # SFT runs until greedy accuracy on a validation slice of the training distribution
    # reaches target_accuracy (checked every check_every steps), at most `steps` steps:
    # a partly competent policy, at the same competence for every seed.
    steps: int = Field(1500, ge=0)
    target_accuracy: float = Field(0.4, gt=0, le=1)
    check_every: int = Field(25, ge=1)
    check_size: int = Field(256, ge=1)
    # AdamW, linear warmup then cosine decay to 0 at `steps` (or constant). A decaying 1e-3
    # reached the target on every seed tried where a constant 3e-3 stalled at ~0.06 on some.
    lr: float = Field(1e-3, gt=0)
    schedule: Schedule = "cosine"
    batch_size: int = Field(64, gt=0)
    warmup_steps: int = Field(50, ge=0)
    # Budget spent below target: "error" stops the run naming both numbers; "continue" runs RL
    # from the weaker policy (logged as missed). Either way the result is cached as a miss.
    on_miss: Literal["error", "continue"] = "error"
    # Shared cache of warm-started weights; None = $DRPO_CACHE or ~/.cache/drpo.
    cache_dir: str | None = None


class TaskConfig(_Section):
    name: Literal["arithmetic", "jsonl", "wordproblems"] = "arithmetic"
    digits: int = Field(2, ge=1, le=6)  # arithmetic: operand digits
    n_ops: int = Field(2, ge=1, le=4)  # wordproblems: changes to the count per problem
    ops: str = "+"  # arithmetic: operators drawn uniformly, from "+-*"
    dataset: str | None = None  # jsonl: path of {"prompt"|"question", "answer"} lines
    eval_dataset: str | None = None  # jsonl: separate eval file (default: hold out eval_size)
    eval_size: int = Field(256, gt=0)
    reward: Literal["exact", "math"] | None = None  # None: exact for arithmetic, math for jsonl
    prompt_template: str = "{prompt}"  # wraps each prompt before the chat template

    @field_validator("ops")
    @classmethod
    def _ops(cls, v: str) -> str:
        if not v or any(op not in "+-*" for op in v):
            raise ValueError(f"must be a non-empty string of operators from '+-*', got {v!r}")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            v.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"must be a format string using only {{prompt}}, got {v!r} ({err})") from None
        return v

    @model_validator(mode="after")
    def _dataset_matches_name(self):
        if self.name == "jsonl" and not self.dataset:
            raise ValueError("task.name='jsonl' needs task.dataset=<path.jsonl>")
        if self.name != "jsonl" and (self.dataset or self.eval_dataset):
            raise ValueError(f"task.dataset={self.dataset!r} is set but task.name={self.name!r}; set task.name=jsonl")
        if self.name == "wordproblems" and self.reward is not None:
            raise ValueError(f"task.reward={self.reward!r}: wordproblems has its own verifier (leave task.reward unset)")
        return self

    @property
    def reward_name(self) -> str:
        return self.reward or ("exact" if self.name == "arithmetic" else "math")


class RolloutConfig(_Section):
    precision: Precision = "fp32"
    n_samples: int = Field(8, ge=1)  # G completions per prompt
    prompts_per_step: int = Field(32, ge=1)
    max_new_tokens: int = Field(6, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    sync_every: int = Field(1, ge=1)  # rollout weights refreshed every k steps (staleness)


class ObjectiveConfig(_Section):
    method: str = "drpo"
    params: dict[str, float | bool] = Field(default_factory=dict)
    agg: AggMode = "token-mean"
    horizon: int | None = Field(None, gt=0)
    anchor: Literal["rollout", "recompute"] = "rollout"

    @model_validator(mode="after")
    def _method_and_params(self):
        method = get_method(self.method)  # ValueError naming the method and the known ones
        method.resolve_params(self.params)  # ValueError naming the parameter and value
        return self

    @property
    def resolved_params(self) -> dict[str, float | bool]:
        return get_method(self.method).resolve_params(self.params)


class AdvantageConfig(_Section):
    estimator: Literal["mean", "grpo", "rloo"] = "mean"


class OptimConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)  # linear warmup, in optimizer steps
    # then constant, or cosine decay to 0 at the run's last optimizer step
    schedule: Schedule = "constant"
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step
    updates_per_rollout: int = Field(4, ge=1)  # optimizer steps (mini-batches) per rollout batch


class TrainConfig(_Section):
    steps: int = Field(150, ge=1)
    eval_every: int = Field(10, ge=1)
    save_every: int = Field(25, ge=1)
    save_final: bool = True  # also checkpoint the last step
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None = torch default


class DumpConfig(_Section):
    """Opt-in rollout dumps for `drpo inspect` (docs/inspect.md): every `every` steps the
    batch's per-token log-probs, advantages and token ids go to a Parquet shard in `dir`."""

    every: int = Field(0, ge=0)  # 0 = off
    dir: str = "dumps"  # relative to the run's output directory
    after: bool = True  # also the train-side log-probs after the step's update (one more forward)


class Config(_Section):
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    warmstart: WarmstartConfig = Field(default_factory=WarmstartConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dump: DumpConfig = Field(default_factory=DumpConfig)

    @model_validator(mode="after")
    def _batch_splits(self):
        n = self.rollout.prompts_per_step * self.rollout.n_samples
        per_update = n // self.optim.updates_per_rollout
        if n % self.optim.updates_per_rollout or per_update % self.optim.grad_accum:
            raise ValueError(
                f"rollout batch of {n} samples (rollout.prompts_per_step * rollout.n_samples) must split evenly "
                f"into optim.updates_per_rollout={self.optim.updates_per_rollout} mini-batches of "
                f"optim.grad_accum={self.optim.grad_accum} micro-batches"
            )
        return self


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {key!r} (value {e['input']!r})")
        elif e["type"] == "value_error" and isinstance(e["input"], dict):
            lines.append(f"config section {key!r}: {msg}")  # a cross-field check; msg names the keys
        else:
            lines.append(f"config key {key!r} = {e['input']!r}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def override_value(key: str, raw: str) -> Any:
    """The value of `--set KEY=RAW`, parsed as YAML: numbers, bools, null, lists ('' when empty)."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {err}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], the value as `override_value` parses it)."""
    key, raw = split_assignment(item, "--set expects key=value with a dotted key", error=ConfigError,
                                ok=lambda key, _: all(key.split(".")))
    return key.split("."), override_value(key, raw)


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(read_utf8(path))
    except NotUTF8Error as err:
        raise ConfigError(f"config file {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `key=value` overrides -> validated Config."""
    tree = load_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(tree, *parse_override(item))
    return build_config(tree)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _set_leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _set_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def resume_config(saved_yaml: str, cfg: Config, where: str) -> Config:
    """The config a resumed run continues with: the one saved with the run. Only the keys set
    now (config file or --set) are compared with it, so a default changed by a newer drpo
    neither strands the run nor changes it half-way; keys left unset come from the save."""
    try:
        saved = build_config(yaml.safe_load(saved_yaml) or {})
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"the config saved in {where} cannot be read by this drpo: {err}") from None
    have = dict(_set_leaves(saved.model_dump(mode="json")))
    diffs = [
        f"{key} = {value!r} now, {have.get(key, '(absent)')!r} saved"
        for key, value in _set_leaves(cfg.model_dump(mode="json", exclude_unset=True))
        if have.get(key, object()) != value
    ]
    if diffs:
        raise ConfigError(
            f"--resume with a config different from the one saved in {where}: " + "; ".join(diffs)
            + ". Resume with the same settings (keys you leave unset are taken from the saved config)"
        )
    return saved
