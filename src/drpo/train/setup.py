"""A run's components, resolved once from the typed config (`setup`): the device and seeds,
the model and its tokenizer (the tiny default warm-started), the policy with its optimizer,
training forward and bound objective, the sampler with its prompt encoding and sampling
parameters, the two rollout engines, the dump writer, and the output directory. Nothing after
setup reads the config again."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drpo.files import atomic_write, sweep_temp_files
from drpo.models import build_tiny_model, encode_prompt, load_policy, make_char_tokenizer, quantized_forward
from drpo.models.bpe import task_tokenizer
from drpo.models.logprobs import NonFiniteError, sequence_logprobs
from drpo.objectives import Method, get_method, policy_loss
from drpo.rollout import Rollout, RolloutEngine, SamplingParams, generate, make_engine
from drpo.tasks import Example, Task, check_examples
from drpo.train.batching import decode_completions, encode_prompts
from drpo.train.config import Config, ConfigError, resume_config, to_yaml
from drpo.train.schedule import lr_factor
from drpo.train.warmstart import warm_start


class RunError(RuntimeError):
    """The output directory or a resume request is inconsistent."""


def seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seeds the global RNGs and returns the generator that drives sampling and shuffles."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device='cuda' but no CUDA device is available")
    return torch.device(name)


def load_model(cfg: Config, task: Task, device: torch.device, log=print):
    """The policy (fp32) and its tokenizer; the tiny default gets its cached warm start."""
    if cfg.model.is_tiny:
        m = cfg.model
        tokenizer = make_char_tokenizer() if m.tokenizer == "char" else task_tokenizer(task, m.vocab_size)
        model = build_tiny_model(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                                 intermediate_size=m.intermediate_size, max_position=m.max_position,
                                 seed=cfg.seed).to(device)
        check_task_fits(task, tokenizer, model, cfg)
        info = warm_start(model, tokenizer, task, cfg, log=log) if cfg.warmstart.enabled else {}
        return model, tokenizer, info
    model, tokenizer = load_policy(cfg.model.name, seed=cfg.seed)
    check_task_fits(task, tokenizer, model, cfg)
    return model.to(device), tokenizer, {}


def check_task_fits(task: Task, tokenizer, model, cfg: Config) -> None:
    """At load, not when an example is first sampled: every prompt and answer tokenizes and
    every prompt leaves room for max_new_tokens in the model's positions."""
    check_examples(
        task,
        encode_prompt=lambda text: encode_prompt(tokenizer, cfg.task.prompt_template.format(prompt=text),
                                                 system=cfg.model.system_prompt),
        encode_answer=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        unk_id=tokenizer.unk_token_id,
        max_positions=getattr(model.config, "max_position_embeddings", None),
        max_new_tokens=cfg.rollout.max_new_tokens,
        positions_key="model.max_position" if cfg.model.is_tiny else f"max_position_embeddings of {cfg.model.name}",
    )


def weights_finite(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


@dataclass(frozen=True)
class Policy:
    """The trainer side: the policy, its optimizer and lr schedule, its training forward at
    the rollout precision and the objective (the registered method, its resolved parameters
    and aggregation)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: str  # of the training forward: fp8-quantized under fp8_e2e, else the fp32 model
    temperature: float  # train-side log-probs are of the distribution sampled from
    method: Method
    params: dict  # the method's, resolved
    agg: str
    horizon: int | None
    recompute_anchor: bool  # anchor = train-side log-probs before the first update (else the rollout's)
    minibatches: int  # optimizer steps per rollout batch
    microbatches: int  # micro-batches per optimizer step
    grad_clip: float

    def loss(self, logp, anchor, advantages, mask):
        """(loss, metrics) of the response tokens `mask`. nonfinite="drop": a NaN/inf log-prob
        is counted in the metrics the loss already brings to the host, and the step turns a
        nonzero count into a divergence (no sync of its own)."""
        return policy_loss(self.method, logp, anchor, advantages, mask, agg=self.agg, horizon=self.horizon,
                           nonfinite="drop", **self.params)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Train-side log-probs of the response tokens at the sampling temperature. A NaN/inf
        in the forward's hidden states or LM head is a divergence (FloatingPointError): its
        inputs are token ids, so only the policy's own numbers can have overflowed."""
        try:
            with quantized_forward(self.model, self.precision):
                return sequence_logprobs(self.model, input_ids, attention_mask, response_start=prompt_len,
                                         temperature=self.temperature)
        except NonFiniteError as err:  # other ValueErrors are bad input and stay errors
            weights = "finite" if weights_finite(self.model) else "non-finite"
            raise FloatingPointError(f"the policy's forward overflowed: {err} (its weights are {weights}; "
                                     f"method {self.method.name!r})") from err


def make_policy(model, cfg: Config) -> Policy:
    o, obj = cfg.optim, cfg.objective
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    total = cfg.train.steps * o.updates_per_rollout  # optimizer steps in the run
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, total, o.schedule)
    )
    method = get_method(obj.method)
    return Policy(
        model=model, optimizer=optimizer, scheduler=scheduler, precision=cfg.rollout.precision,
        temperature=cfg.rollout.temperature, method=method, params=method.resolve_params(obj.params), agg=obj.agg,
        horizon=obj.horizon, recompute_anchor=obj.anchor == "recompute", minibatches=o.updates_per_rollout,
        microbatches=o.grad_accum, grad_clip=o.grad_clip,
    )


@dataclass(frozen=True)
class Sampler:
    """The rollout side: the task, its prompts' encoding (template, chat template, system
    turn), the sampling parameters, and decoding and scoring."""

    task: Task
    tokenizer: Any
    template: str  # the task's prompt template
    system: str | None  # the system turn of chat-templated models
    sampling: SamplingParams  # the rollouts'
    greedy: SamplingParams  # evaluation's: one greedy completion per prompt

    def encode(self, examples: list[Example]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, examples, template=self.template, system=self.system)

    def sample(self, engine, examples: list[Example], generator, params: SamplingParams | None = None) -> Rollout:
        params = self.sampling if params is None else params
        return generate(engine, self.encode(examples), params, generator=generator)

    def score(self, rollout: Rollout, examples: list[Example]) -> torch.Tensor:
        """One reward per sample; rows i*n..(i+1)*n-1 belong to examples[i]."""
        texts = decode_completions(self.tokenizer, rollout.response_ids.cpu(), rollout.response_mask.cpu())
        n = len(texts) // len(examples)
        answers = [ex.answer for ex in examples for _ in range(n)]
        return torch.tensor([self.task.reward(t, a) for t, a in zip(texts, answers)], dtype=torch.float32)


def make_sampler(cfg: Config, task: Task, tokenizer) -> Sampler:
    r = cfg.rollout
    sampling = SamplingParams(
        n_samples=r.n_samples, max_new_tokens=r.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
    )
    return Sampler(task, tokenizer, cfg.task.prompt_template, cfg.model.system_prompt, sampling,
                   replace(sampling, n_samples=1, greedy=True))


def make_dumper(cfg: Config, out_dir: Path):
    """The `drpo inspect` dump writer of this run, or None (cfg.dump.every == 0)."""
    if not cfg.dump.every:
        return None
    from drpo.dumps import DumpWriter

    r = cfg.rollout
    meta = {
        "source": "drpo_train",
        "model": cfg.model.name,
        "method": cfg.objective.method,
        "params": cfg.objective.resolved_params,
        "anchor": cfg.objective.anchor,
        "sampling": {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "precision": r.precision},
        "tokenizer": None if cfg.model.is_tiny else cfg.model.name,
        "columns": {
            "logp_rollout": f"rollout engine ({r.precision}) log-prob of the sampled token under the sampling "
                            "distribution (temperature, top-p, top-k applied)",
            "logp_before": "train-side (fp32) log-prob at the sampling temperature, before the step's update",
            "logp_after": "train-side log-prob after the step's optimizer steps",
        },
    }
    return DumpWriter(out_dir / cfg.dump.dir, every=cfg.dump.every, metadata=meta)


@dataclass(frozen=True)
class Run:
    """A run's components; the step and the evaluation take them from here instead of
    reading the config again."""

    policy: Policy
    sampler: Sampler
    engine: RolloutEngine  # samples the rollouts; synced every `sync_every` steps
    eval_engine: RolloutEngine  # evaluation's copy; synced before each eval
    prompts_per_step: int
    sync_every: int
    estimator: str  # group advantage estimator
    dumper: Any = None  # the run's `drpo inspect` DumpWriter (imported only when dumping), or None
    dump_after: bool = True  # also dump the train-side log-probs after the update
    warm: dict = field(default_factory=dict)  # the warm start's record (tiny model)


def setup(cfg: Config, task: Task, device, out_dir: Path | None = None, log=print) -> Run:
    """Everything a run needs, built once from `cfg`: the policy (warm-started), its
    optimizer, training forward and objective, the sampler, the two engines, the dumper."""
    model, tokenizer, warm = load_model(cfg, task, device, log=log)
    return Run(
        policy=make_policy(model, cfg), sampler=make_sampler(cfg, task, tokenizer),
        engine=make_engine(model, cfg.rollout.precision), eval_engine=make_engine(model, cfg.rollout.precision),
        prompts_per_step=cfg.rollout.prompts_per_step, sync_every=cfg.rollout.sync_every,
        estimator=cfg.advantage.estimator, dumper=make_dumper(cfg, out_dir) if out_dir is not None else None,
        dump_after=cfg.dump.after, warm=warm,
    )


def saved_config(out_dir: Path, cfg: Config, resume: bool) -> Config:
    """What a resumed run continues with: its saved config, checked against the keys set now."""
    saved = out_dir / "config.yaml"
    if not (resume and saved.is_file()):
        return cfg
    try:
        return resume_config(saved.read_text(), cfg, str(saved))
    except ConfigError as err:
        raise RunError(str(err)) from None


def prepare_out_dir(out_dir: Path, cfg: Config, resume: bool) -> None:
    """Called with the directory's lock held."""
    has_run = (out_dir / "metrics.jsonl").exists() or (out_dir / "checkpoints").exists()
    if has_run and not resume:
        raise RunError(f"output directory {out_dir} already holds a run; pass --resume to continue it or pick another --out")
    if not (resume and (out_dir / "config.yaml").exists()):  # a resumed run keeps the saved one
        atomic_write(out_dir / "config.yaml", to_yaml(cfg), "config")
    (out_dir / "summary.json").unlink(missing_ok=True)  # its presence must mean "finished"
    sweep_temp_files(out_dir)
