"""DRPOGRPOTrainer as a drop-in for TRL 1.16's GRPOTrainer.

The reference everywhere is TRL's own code: `GRPOTrainer._compute_loss` run unbound on the
same trainer, model weights and batch, and TRL's own `_generate_and_score_completions`
building that batch (normalisers, masks, `num_items_in_batch`, vLLM importance-sampling
ratios). With drpo_method="grpo" and TRL's clip range the two losses must be equal."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
from datasets import Dataset  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from drpo.integrations.trl import FORWARD_INPUTS, LOSS_TYPES, DRPOConfig, DRPOGRPOTrainer  # noqa: E402
from drpo.models import make_char_tokenizer  # noqa: E402
from drpo.objectives import METRIC_NAMES  # noqa: E402
from trl_helpers import PROMPTS, TINY_ARGS, digit_reward, spread_reward, tiny_model  # noqa: E402

GRPO = dict(drpo_method="grpo", drpo_params={"eps_low": 0.2, "eps_high": 0.2})  # TRL's default epsilon=0.2
G = 4  # generations per prompt


def make_config(tmp_path, **overrides) -> DRPOConfig:
    kwargs = dict(TINY_ARGS, output_dir=str(tmp_path), gradient_accumulation_steps=2, num_generations=G, max_steps=2)
    kwargs.update(GRPO)
    kwargs.update(overrides)
    return DRPOConfig(**kwargs)


def make_trainer(tmp_path, cls=DRPOGRPOTrainer, model=None, rollout_func=None, reward=digit_reward, **overrides):
    tokenizer = make_char_tokenizer()
    if model is None:
        model = tiny_model(tokenizer)
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    return cls(
        model=model,
        reward_funcs=reward,
        args=make_config(tmp_path, **overrides),
        train_dataset=data,
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )


class RecordingTrainer(DRPOGRPOTrainer):
    """At every loss call during training, checks our loss and its parameter gradient
    against TRL's own `GRPOTrainer._compute_loss` on the same batch and weights."""

    records: list

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        ref = GRPOTrainer._compute_loss(self, model, inputs)
        self.records.append(compare(model, loss, ref))
        return loss


def compare(model, loss, ref) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    pairs = [(g, w) for g, w in zip(got, want) if g is not None or w is not None]
    assert all(g is not None and w is not None for g, w in pairs), "different parameters receive gradient"
    return dict(
        loss=float(loss.detach()),
        ref=float(ref.detach()),
        grad_err=max(float((g - w).abs().max()) for g, w in pairs),
        grad_scale=max(float(w.abs().max()) for _, w in pairs),
    )


def assert_matches(rec: dict) -> None:
    assert rec["loss"] == pytest.approx(rec["ref"], rel=1e-5, abs=1e-7)
    assert rec["grad_scale"] > 0
    assert rec["grad_err"] <= 1e-5 * rec["grad_scale"] + 1e-9


# ------------------------------------------------------------------ a scripted "rollout engine"
# TRL's `rollout_func` extension point stands in for vLLM: it returns completions and their
# sampling log-probs, which TRL's own `_generate_and_score_completions` turns into the batch.
# Completions are fixed strings (ragged, some ending in <eos>, one with an env/tool mask), the
# log-probs are the policy's own minus a per-row shift (the train/inference mismatch).
COMPLETIONS = ["1234", "a1b2c3", "7", "xyz9", "88", "q", "5a5a5a", "12"]
ENDS_WITH_EOS = [True, False, False, True, True, False, True, True]
# Shift of each row's sampling log-probs below the policy's: rows 1 and 4 are far off (mu << pi).
SHIFTS = [0.0, 2.5, 0.1, 0.0, 1.5, 0.0, 0.05, 0.15]


def scripted_rollout(prompts, trainer):
    tok = trainer.processing_class
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids, env_mask = [], []
    for i in range(len(prompts)):
        j = i % len(COMPLETIONS)
        ids = tok(COMPLETIONS[j], add_special_tokens=False)["input_ids"]
        completion_ids.append(ids + [tok.eos_token_id] if ENDS_WITH_EOS[j] else ids)
        env_mask.append([0 if (j == 6 and t in (1, 2)) else 1 for t in range(len(completion_ids[-1]))])
    logprobs = []
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            ids = torch.tensor([p + c])
            lp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), len(c))
            shift = torch.zeros(len(c))
            shift[0] = SHIFTS[i % len(SHIFTS)]  # one token per row carries the mismatch
            logprobs.append((lp[0] - shift).tolist())
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs, "env_mask": env_mask}


def generated_batch(trainer, vllm_mode: str | None = None, cap: float = 3.0) -> dict:
    """TRL's own `_generate_and_score_completions` output for one generation batch (8 rows).
    With `vllm_mode`, TRL's vLLM importance-sampling branch is switched on (the scripted
    rollout plays vLLM) and computes `importance_sampling_ratio` itself."""
    if vllm_mode is not None:
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode = vllm_mode
        trainer.vllm_importance_sampling_clip_max = cap
        trainer._last_loaded_step = trainer.state.global_step  # no vLLM weight sync to do
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(G)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return batch


# ------------------------------------------------------------------ loss and gradients == TRL's
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_grads_equal_trls_on_a_ragged_generated_batch(tmp_path, loss_type):
    """Ragged rows, rows masked out by `mask_truncated_completions`, an env/tool mask, clipping
    active on both sides with clip-higher: our loss and gradient equal TRL's, in train and eval."""
    trainer = make_trainer(
        tmp_path,
        rollout_func=scripted_rollout,
        loss_type=loss_type,
        drpo_anchor="old",
        drpo_params={"eps_low": 0.2, "eps_high": 0.28},
        mask_truncated_completions=True,
        steps_per_generation=4,  # != gradient_accumulation_steps: dapo's normaliser rescales
    )
    trainer.epsilon_high = 0.28  # TRL's clip-higher for its reference loss (DRPOConfig refuses `epsilon_high`)
    inputs = generated_batch(trainer)
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    assert (mask.sum(-1) == 0).tolist() == [not e for e in ENDS_WITH_EOS]  # truncated rows masked out
    assert (inputs["tool_mask"][6] == 0).any()  # the env mask reaches the batch
    assert len(set(mask.sum(-1).tolist())) >= 3  # ragged
    assert int(inputs["num_items_in_batch"]) == int(mask.sum())
    # A later iteration on the same rollout: the policy has moved away from the old log-probs.
    g = torch.Generator().manual_seed(1)
    old = inputs["old_per_token_logps"]
    inputs["old_per_token_logps"] = (old + 0.4 * torch.randn(old.shape, generator=g)).clamp(max=-1e-4)

    model = trainer.model
    for mode in ("train", "eval"):
        model.train(mode == "train")
        rec = compare(model, trainer._compute_loss(model, inputs), GRPOTrainer._compute_loss(trainer, model, inputs))
        assert_matches(rec)
    logged = trainer._metrics["eval"]
    assert logged["drpo/beyond_boundary_pos_frac"][-1] > 0 and logged["drpo/beyond_boundary_neg_frac"][-1] > 0

    # TRL's two-sided clip `delta` is grpo's dual clip: equal again, and it changes the loss.
    plain = float(trainer._compute_loss(model, inputs))
    trainer.args.delta, trainer.drpo_params["dual_clip"] = 1.3, 1.3
    rec = compare(model, trainer._compute_loss(model, inputs), GRPOTrainer._compute_loss(trainer, model, inputs))
    assert_matches(rec)
    assert rec["loss"] != pytest.approx(plain, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_two_training_steps_equal_trls_loss(tmp_path, loss_type):
    """Two real `trainer.train()` steps (gradient accumulation 2, one generation batch for
    both steps, so step 2 is off-policy): every micro-batch's loss and gradient equal TRL's."""
    trainer = make_trainer(
        tmp_path, cls=RecordingTrainer, reward=spread_reward, loss_type=loss_type, steps_per_generation=4
    )
    trainer.records = []
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(trainer.records) == 4
    for rec in trainer.records:
        assert_matches(rec)
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(trainer.model.parameters(), before))
    logged = [e for e in trainer.state.log_history if "drpo/weight_mean" in e]
    assert len(logged) == 2
    assert all(f"drpo/{name}" in logged[0] for name in METRIC_NAMES)
    assert logged[1]["drpo/ratio_max"] != pytest.approx(1.0)  # step 2 is off-policy


# ------------------------------------------------------------------ MoE router aux loss
def tiny_moe(tokenizer):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        router_aux_loss_coef=0.5,  # large, so the aux term visibly moves the gradient
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(config).float()


@pytest.mark.slow
def test_moe_router_aux_loss_is_added_as_trl_adds_it(tmp_path):
    model = tiny_moe(make_char_tokenizer())
    trainer = make_trainer(
        tmp_path, cls=RecordingTrainer, model=model, reward=spread_reward, loss_type="dapo", num_iterations=2
    )
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.5
    trainer.records = []
    trainer.train()
    assert len(trainer.records) == 4
    for rec in trainer.records:
        assert_matches(rec)
    logged = [e for e in trainer.state.log_history if "aux_loss" in e]
    assert len(logged) == 2 and all(e["aux_loss"] > 0 for e in logged)


def test_moe_aux_loss_term_is_coef_times_aux_over_accumulation(tmp_path):
    """The MoE loss exceeds the same loss without the router term by coef * aux / accumulation."""
    model = tiny_moe(make_char_tokenizer())
    trainer = make_trainer(tmp_path, model=model, rollout_func=scripted_rollout, drpo_anchor="old", num_iterations=2)
    inputs = generated_batch(trainer)
    with_aux = trainer._compute_loss(trainer.model, inputs)
    aux = trainer._metrics["train"]["aux_loss"][-1]
    trainer.aux_loss_enabled = False
    without = trainer._compute_loss(trainer.model, inputs)
    expected = 0.5 * aux / trainer.current_gradient_accumulation_steps
    assert float((with_aux - without).detach()) == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


# ------------------------------------------------------------------ every model input reaches the forward
def test_forward_receives_every_input_trls_compute_loss_passes(tmp_path):
    """The keyword inputs our forward receives are exactly those TRL's `_compute_loss` passes
    on the same batch (multimodal tensors included), and FORWARD_INPUTS covers every model
    input TRL's helper accepts."""
    helper = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    control = {"self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
               "compute_aux_loss"}
    assert set(FORWARD_INPUTS) == set(helper) - control

    class Spy(DRPOGRPOTrainer):
        calls: list

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kw):
            self.calls.append(kw)
            # The tiny text model has no vision tower: run it on the text inputs only.
            kw = {k: v for k, v in kw.items() if k not in FORWARD_INPUTS}
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw)

    trainer = make_trainer(tmp_path, cls=Spy, rollout_func=scripted_rollout, drpo_anchor="old", num_iterations=2)
    trainer.calls = []
    inputs = generated_batch(trainer)
    g = torch.Generator().manual_seed(0)
    extra = {
        "pixel_values": torch.randn(8, 12, generator=g),
        "image_grid_thw": torch.tensor([[1, 1, 1]] * 8),
        "num_images": [1] * 8,
        "token_type_ids": torch.zeros_like(inputs["prompt_ids"]),
        "mm_token_type_ids": torch.zeros_like(inputs["prompt_ids"]),
    }
    inputs |= extra
    trainer.calls = []
    trainer._compute_loss(trainer.model, inputs)
    GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    ours, trls = trainer.calls
    assert ours.keys() == trls.keys()
    for key in ours:
        assert ours[key] is trls[key], key
    for key in extra:
        assert ours[key] is extra[key]


def tiny_qwen2_vl(tokenizer):
    """A tiny random Qwen2-VL (vision tower + M-RoPE text model); image/vision ids are the
    last ids of the character vocabulary."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    v = len(tokenizer)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=v - 1, vision_start_token_id=v - 2, vision_end_token_id=v - 3, video_token_id=v - 4,
    )
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).float()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_multimodal_batch_equals_trl(tmp_path, loss_type):
    """A Qwen2-VL batch shaped as TRL builds it (pixel_values, image_grid_thw, num_images,
    mm_token_type_ids over prompt + completion): loss and gradients equal TRL's, and the
    vision tower gets gradient (the images reached the forward)."""
    tokenizer = make_char_tokenizer()
    model = tiny_qwen2_vl(tokenizer)
    trainer = make_trainer(tmp_path, model=model, loss_type=loss_type, drpo_anchor="old")
    v, g = len(tokenizer), torch.Generator().manual_seed(0)
    # Each prompt: text, <vision_start> <image> <vision_end>, text (one merged patch per image).
    prompt_ids = torch.tensor([[5, 6, v - 2, v - 1, v - 3, 7], [0, 8, v - 2, v - 1, v - 3, 9]] * 2)
    prompt_mask = (prompt_ids != 0).long()
    completion_ids = torch.randint(3, v - 4, (4, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    grid = torch.tensor([[1, 2, 2]] * 4)
    mm = torch.cat([(prompt_ids == v - 1).long(), torch.zeros_like(completion_ids)], dim=1)
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, advantages=torch.tensor([0.9, -0.4, 0.3, -0.8]),
        num_items_in_batch=completion_mask.sum(), pixel_values=torch.randn(16, 24, generator=g),
        image_grid_thw=grid, num_images=[1, 1, 1, 1], mm_token_type_ids=mm,
    )
    with torch.no_grad():  # an older policy: TRL's logps with the images, shifted
        lp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), 5,
            pixel_values=inputs["pixel_values"], image_grid_thw=grid, num_images=[1] * 4, mm_token_type_ids=mm,
        )
    inputs["old_per_token_logps"] = (lp + 0.3 * torch.randn(lp.shape, generator=g)).clamp(max=-1e-4)
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    ref = GRPOTrainer._compute_loss(trainer, model, inputs)
    assert_matches(compare(model, trainer._compute_loss(model, inputs), ref))
    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.model.visual.parameters())


# ------------------------------------------------------------------ vLLM importance-sampling correction
def logps_grad(trainer, inputs) -> torch.Tensor:
    """d loss / d (current per-token log-probs), through our `_compute_loss`."""
    captured = {}
    policy_logps = DRPOGRPOTrainer._policy_logps

    def spy(self, model, inputs):
        out = policy_logps(self, model, inputs)
        out[0].retain_grad()
        captured["logps"] = out[0]
        return out

    trainer._policy_logps = spy.__get__(trainer)
    trainer._compute_loss(trainer.model, inputs).backward()
    return captured["logps"].grad


@pytest.mark.parametrize("mode", ["sequence_mask", "token_mask", "sequence_truncate", "token_truncate"])
@pytest.mark.parametrize("anchor", ["old", "rollout"])
def test_vllm_importance_sampling_modes(tmp_path, mode, anchor):
    """Batches from TRL's own vLLM IS branch, in each of its modes: rejected sequences (and
    tokens) carry no gradient, every other response token does; with the "old" anchor the
    loss is TRL's; the truncate modes are refused with the rollout anchor."""
    trainer = make_trainer(tmp_path, rollout_func=scripted_rollout, drpo_anchor=anchor, loss_type="dapo")
    inputs = generated_batch(trainer, vllm_mode=mode, cap=3.0)
    ratio, mask = inputs["importance_sampling_ratio"], inputs["completion_mask"] * inputs["tool_mask"]
    assert ratio.shape == ((8, 1) if mode.startswith("sequence") else (8, mask.size(1)))
    if anchor == "rollout" and mode.endswith("truncate"):
        with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
            trainer._compute_loss(trainer.model, inputs)
        return
    if anchor == "old":
        model = trainer.model
        ref = GRPOTrainer._compute_loss(trainer, model, inputs)
        assert_matches(compare(model, trainer._compute_loss(model, inputs), ref))
    rejected = (torch.broadcast_to(ratio, mask.shape) == 0) & (mask != 0)
    if mode.endswith("mask"):
        # Rows 1 and 4 (shift 2.5 and 1.5 > log 3) exceed the cap: as whole sequences, or at their first token.
        expected = torch.zeros_like(rejected)
        for row in (1, 4):
            if mode == "sequence_mask":
                expected[row] = mask[row] != 0
            else:
                expected[row, 0] = True
        assert torch.equal(rejected, expected)
    else:
        assert not rejected.any() and float(ratio.max()) == pytest.approx(3.0)  # truncated at the cap
    if anchor == "rollout":  # the loss value: TRL's rejections kept as 0/1, its ratio not multiplied in
        kept_ratio = torch.broadcast_to(ratio, mask.shape)[(mask != 0) & ~rejected]
        assert (kept_ratio - 1).abs().max() > 0.01  # multiplying the ratio in would change the loss
        assert float(trainer._compute_loss(trainer.model, inputs).detach()) == pytest.approx(
            hand_rollout_anchor_loss(trainer, inputs), rel=1e-6)
    grad = logps_grad(trainer, inputs)
    carries = (mask != 0) & (inputs["advantages"][:, None] != 0)
    assert (grad[rejected] == 0).all()
    assert (grad[carries & ~rejected] != 0).all()


def hand_rollout_anchor_loss(trainer, inputs) -> float:
    """GRPO's clipped surrogate against vLLM's log-probs (NaN: TRL's old log-probs), written out in
    float64: tokens TRL's "*_mask" mode rejected (ratio 0) drop out, the rest count with weight 1;
    the sum is divided as TRL's "dapo" loss divides it (num_items_in_batch over the processes,
    times gradient_accumulation_steps / steps_per_generation, in train mode)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                 inputs["completion_ids"].size(1))
    logps, rollout = logps.double(), inputs["sampling_per_token_logps"].double()
    old = inputs["old_per_token_logps"]
    anchor = torch.where(torch.isnan(rollout), logps if old is None else old.double(), rollout)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).double()
    keep = (torch.broadcast_to(inputs["importance_sampling_ratio"], mask.shape) > 0).double()
    adv = inputs["advantages"].double()[:, None]
    r = torch.exp(logps - anchor)
    surrogate = torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)  # eps_low = eps_high = 0.2
    a = trainer.args
    normalizer = float(inputs["num_items_in_batch"]) / trainer.accelerator.num_processes
    normalizer *= a.gradient_accumulation_steps / a.steps_per_generation
    return float(-(surrogate * mask * keep).sum() / normalizer)


def test_logged_entropy_is_the_mean_over_response_tokens(tmp_path):
    """TRL's `entropy` metric: its per-token entropies averaged over the loss mask, not padding."""
    trainer = make_trainer(tmp_path, rollout_func=scripted_rollout, drpo_anchor="old")
    inputs = generated_batch(trainer)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                     inputs["completion_ids"].size(1),
                                                                     compute_entropy=True)
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).double()
    assert (mask == 0).any()  # padding and tool tokens, whose entropies must not count
    want = float((entropies.double() * mask).sum() / mask.sum())
    assert abs(float((entropies.double()).mean()) - want) > 1e-3  # the data tells the two means apart
    trainer._compute_loss(trainer.model, inputs)
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(want, rel=1e-5)


def test_rollout_anchor_with_truncate_mode_refused_at_config_time(tmp_path):
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode='token_truncate'.*drpo_anchor='old'"):
        make_config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_truncate")
    make_config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_truncate", drpo_anchor="old")
    make_config(tmp_path, use_vllm=True, vllm_importance_sampling_mode="sequence_mask")  # TRL's default: fine


# ------------------------------------------------------------------ fields the loss would ignore
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(delta=0.15), r"`delta=0.15`.*drpo_params=\{\"delta\": \.\.\.\}"),
        (dict(drpo_method="grpo", delta=3.0), r"`delta=3.0`.*drpo_params=\{\"dual_clip\": 3.0\}"),
        (dict(epsilon=0.3), r"`epsilon=0.3`.*drpo_params"),
        (dict(epsilon_high=0.28), r"`epsilon_high=0.28`.*drpo_params"),
        (dict(loss_type="cispo"), r"`loss_type='cispo'`.*drpo_method='cispo'"),
        (dict(loss_type="sapo"), r"`loss_type='sapo'`"),
        (dict(loss_type="luspo"), r"`loss_type='luspo'`"),
        (dict(loss_type="vespo"), r"`loss_type='vespo'`"),
        (dict(entropy_coef=0.01), r"`entropy_coef=0.01`"),
        (dict(off_policy_mask_threshold=0.5), r"`off_policy_mask_threshold=0.5`"),
    ],
)
def test_config_refuses_fields_the_loss_would_ignore(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **({"drpo_method": "drpo", "drpo_params": {}} | overrides))


def test_config_field_rule_is_difference_from_trls_default(tmp_path):
    # TRL's defaults, even passed explicitly, are accepted; the grpo method names its own parameters.
    make_config(tmp_path, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo")
    names_grpo_params = r"drpo_params=\{\"eps_low\": \.\.\., \"eps_high\": \.\.\..*drpo_method='grpo'"
    with pytest.raises(ValueError, match=names_grpo_params):
        make_config(tmp_path, epsilon_high=0.28)


# ------------------------------------------------------------------ non-finite inputs
def test_nonfinite_sampling_logp_is_dropped_and_counted(tmp_path):
    """A -inf rollout log-prob at one response position: finite loss and gradients, that token
    gets no gradient, drpo/nonfinite_tokens = 1. A NaN one (vLLM could not score it) trains
    against TRL's old log-probs, as TRL does, and is counted as a fallback, not dropped."""
    trainer = make_trainer(tmp_path, rollout_func=scripted_rollout, num_iterations=2)  # anchor auto -> rollout
    inputs = generated_batch(trainer)
    sampling = inputs["sampling_per_token_logps"].clone()
    sampling[0, 1] = float("-inf")
    sampling[3, 2] = float("nan")
    inputs["sampling_per_token_logps"] = sampling
    grad = logps_grad(trainer, inputs)
    assert torch.isfinite(grad).all()
    assert grad[0, 1] == 0 and grad[0, 0] != 0 and grad[3, 2] != 0
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
    logged = trainer._metrics["train"]
    assert logged["drpo/nonfinite_tokens"][-1] == 1.0
    n_tokens = float((inputs["completion_mask"] * inputs["tool_mask"]).sum())
    assert logged["drpo/anchor_fallback_frac"][-1] == pytest.approx(1 / n_tokens)
    assert logged["drpo/tokens"][-1] == n_tokens - 1


def test_nonfinite_old_logp_is_dropped_like_padding(tmp_path):
    """A NaN in TRL's old log-probs (anchor "old"), loss_type bnpo: the loss equals TRL's on
    the same batch with that token masked out as padding."""
    trainer = make_trainer(tmp_path, rollout_func=scripted_rollout, drpo_anchor="old", loss_type="bnpo",
                           num_iterations=2)
    padded = generated_batch(trainer)
    inputs = dict(padded, old_per_token_logps=padded["old_per_token_logps"].clone())
    inputs["old_per_token_logps"][4, 1] = float("nan")
    # TRL's reference: the token masked out of the loss only (tool_mask; the attention is unchanged).
    padded["tool_mask"] = padded["tool_mask"].clone()
    padded["tool_mask"][4, 1] = 0
    model = trainer.model
    ref = GRPOTrainer._compute_loss(trainer, model, padded)
    assert_matches(compare(model, trainer._compute_loss(model, inputs), ref))
    assert trainer._metrics["train"]["drpo/nonfinite_tokens"][0] == 1.0


def test_strict_raises_on_nonfinite(tmp_path):
    trainer = make_trainer(tmp_path, rollout_func=scripted_rollout, num_iterations=2,
                           drpo_params={"strict": True, "eps_low": 0.2, "eps_high": 0.2})
    assert trainer.nonfinite == "raise" and "strict" not in trainer.drpo_params
    inputs = generated_batch(trainer)
    inputs["sampling_per_token_logps"] = inputs["sampling_per_token_logps"].clone()
    inputs["sampling_per_token_logps"][0, 1] = float("-inf")
    with pytest.raises(ValueError, match="`old_logp` has a non-finite value -inf"):
        trainer._compute_loss(trainer.model, inputs)
    with pytest.raises(ValueError, match="strict"):
        make_config(tmp_path, drpo_params={"strict": "yes"})
