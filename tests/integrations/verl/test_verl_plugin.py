"""drpo's verl plugin against the real verl package (run in the verl venv, see conftest.py).

References are independent of our adapter: `drpo.objectives.policy_loss` called directly,
and verl's own loss implementations (vanilla PPO, dppo_tv, dppo_kl, cispo), whose math is
the same as ours under the configurations chosen below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch
import verl as verl_pkg
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
from verl.workers.config import FSDPActorConfig, PolicyLossConfig

from drpo.integrations import verl as plugin
from drpo.objectives import METHODS, policy_loss

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
VERL_BUILTINS = ("dppo_tv", "dppo_kl", "cispo")


def actor_config(**overrides) -> FSDPActorConfig:
    """verl's real actor config dataclass, as its workers receive it."""
    kwargs = dict(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=2)
    kwargs.update(overrides)
    return FSDPActorConfig(**kwargs)


def verl_batch(seed: int = 0, batch: int = 6, length: int = 9, dtype=torch.float64):
    """verl-shaped inputs: [batch, response_len] log-probs, token-broadcast advantages,
    a bool response mask with ragged lengths and one fully padded row."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, 5, generator=g, dtype=dtype) * 2
    tokens = torch.randint(0, 5, (batch, length), generator=g)
    old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    new_logits = logits + 0.6 * torch.randn(logits.shape, generator=g, dtype=dtype)
    logp = torch.log_softmax(new_logits, -1).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(batch, 1, generator=g, dtype=dtype).expand(batch, length).clone()
    lengths = torch.tensor([length, 3, 7, 1, 0, 5][:batch])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    # verl pads with arbitrary values; they must not leak into the loss.
    logp = torch.where(mask, logp, torch.full_like(logp, -7.0))
    return old, logp, adv, mask


def call(fn, old, logp, adv, mask, agg, config, weights=None):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = fn(
        old_log_prob=old,
        log_prob=logp,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=agg,
        config=config,
        rollout_is_weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


# ---------------------------------------------------------------- loading
LOOKUP = """
import sys
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
print("drpo.integrations.verl" in sys.modules, "drpo" in POLICY_LOSS_REGISTRY, "mask_drpo" in POLICY_LOSS_REGISTRY)
"""

LOADING_CASES = {
    # verl's default: scan the `verl.plugins` entry points (the process never imports drpo itself)
    "entry_point": {},
    # discovery off: nothing of ours may appear, so the other two cases are not vacuous
    "plugins_off": {"VERL_USE_EXTERNAL_PLUGINS": "none"},
    # discovery off, module named in VERL_USE_EXTERNAL_MODULES
    "env_module": {"VERL_USE_EXTERNAL_PLUGINS": "none", "VERL_USE_EXTERNAL_MODULES": "drpo.integrations.verl"},
}


@pytest.fixture(scope="module")
def fresh_verl_processes() -> dict[str, subprocess.CompletedProcess]:
    """`import verl` in fresh processes (one per loading case, run concurrently: each takes
    ~20 s on 2 cores, mostly verl's own imports)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", LOOKUP], env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, env in LOADING_CASES.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize(
    ("case", "expected"),
    [("entry_point", ["True"] * 3), ("plugins_off", ["False"] * 3), ("env_module", ["True"] * 3)],
)
def test_verl_loads_the_plugin_in_every_process(fresh_verl_processes, case, expected):
    result = fresh_verl_processes[case]
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == expected


def test_every_method_registered_and_verl_builtins_untouched():
    assert set(plugin.VERL_LOSS_NAMES) == set(METHODS)
    for method, name in plugin.VERL_LOSS_NAMES.items():
        fn = get_policy_loss_fn(name)
        assert fn.drpo_method == method
        assert name == (f"drpo_{method}" if method in VERL_BUILTINS else method)
    for builtin in VERL_BUILTINS:
        assert not hasattr(POLICY_LOSS_REGISTRY[builtin], "drpo_method")
        assert POLICY_LOSS_REGISTRY[builtin].__module__ == "verl.trainer.ppo.core_algos"
    assert plugin.register_all() == plugin.VERL_LOSS_NAMES  # idempotent


# ---------------------------------------------------------------- same loss and gradient as policy_loss
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_registry_loss_equals_policy_loss(method, agg):
    old, logp, adv, mask = verl_batch(seed=zlib.crc32(f"{method}/{agg}".encode()) % 1000)
    config = actor_config()
    params = plugin.method_params(method, config)
    got_loss, got_grad, metrics = call(get_policy_loss_fn(plugin.VERL_LOSS_NAMES[method]), old, logp, adv, mask, agg, config)

    ref_logp = logp.clone().requires_grad_(True)
    ref_loss, ref_metrics = policy_loss(method, ref_logp, old, adv, mask, agg=agg, **params)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logp)

    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert ref_grad.abs().sum() > 0
    rtol = 1e-12
    if method in ("dppo_tv", "dppo_kl"):  # the value is that of verl's own dppo loss (-A*sg(w)*log pi)
        ref_loss, _ = get_policy_loss_fn(method)(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                                 loss_agg_mode=agg, config=config)
        rtol = 1e-7 if agg == "seq-mean-token-mean" else rtol  # verl divides by count + 1e-8
    torch.testing.assert_close(got_loss, ref_loss.detach(), rtol=rtol, atol=1e-12)
    for key, value in ref_metrics.items():
        if key != "loss":
            assert metrics[plugin.METRIC_PREFIX + key] == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_params_come_from_actor_config():
    # drpo defaults, then verl's clip keys (like verl's own dppo_* / vanilla), then drpo_params.
    cfg = actor_config()
    assert plugin.method_params("drpo", cfg) == dict(METHODS["drpo"].params)
    cfg = actor_config(clip_ratio=0.3, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=5.0)
    assert plugin.method_params("grpo", cfg) == {"eps_low": 0.3, "eps_high": 0.28, "dual_clip": 5.0}
    assert plugin.method_params("dppo_tv", cfg) == {"delta_low": 0.3, "delta_high": 0.28, "ratio_cap": 5.0}
    assert plugin.method_params("cispo", cfg) == {"eps_low": 0.3, "eps_high": 0.28}
    cfg = actor_config(
        clip_ratio_c=5.0,
        policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="grpo", drpo_params={"dual_clip": float("inf"), "strict": True}),
    )
    assert plugin.method_params("grpo", cfg)["dual_clip"] == float("inf")
    assert plugin.strict_mode(cfg) is True and plugin.strict_mode(actor_config()) is False
    cfg = actor_config(
        policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"delta": 0.15, "advantage_weighted": False})
    )
    assert plugin.method_params("drpo", cfg) == {"delta": 0.15, "advantage_weighted": False}


def test_drpo_params_change_the_loss():
    old, logp, adv, mask = verl_batch(seed=3)
    small = actor_config(policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"delta": 0.05}))
    loss_small, grad_small, _ = call(get_policy_loss_fn("drpo"), old, logp, adv, mask, "token-mean", small)
    ref_logp = logp.clone().requires_grad_(True)
    ref, _ = policy_loss("drpo", ref_logp, old, adv, mask, delta=0.05)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(loss_small, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_small, ref_grad, rtol=1e-12, atol=1e-12)
    loss_default, _, _ = call(get_policy_loss_fn("drpo"), old, logp, adv, mask, "token-mean", actor_config())
    assert abs(float(loss_small - loss_default)) > 1e-3


def test_hydra_command_line_overrides_reach_the_loss():
    """The documented command-line overrides, composed by verl's own Hydra config and turned
    into its ActorConfig dataclass, give drpo the parameters."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    config_dir = os.path.join(os.path.dirname(verl_pkg.__file__), "trainer", "config")
    overrides = [
        "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=drpo",
        "+actor_rollout_ref.actor.policy_loss.drpo_params.delta=0.15",
        "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm",
        "actor_rollout_ref.actor.loss_scale_factor=16",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, PolicyLossConfig)
    assert plugin.method_params("drpo", actor) == {"delta": 0.15, "advantage_weighted": True}

    old, logp, adv, mask = verl_batch(seed=4)
    fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    got, grad, _ = call(fn, old, logp, adv, mask, actor.loss_agg_mode, actor)
    ref_logp = logp.clone().requires_grad_(True)
    ref, _ = policy_loss("drpo", ref_logp, old, adv, mask, agg="seq-mean-token-sum-norm", horizon=16, delta=0.15)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- against verl's own losses
def _global_info(mask, dp_size=2):
    # As verl's ppo_loss sets it for one micro-batch of a mini-batch twice its size on each of dp_size ranks.
    return {
        "dp_size": dp_size,
        "batch_num_tokens": int(mask.sum()) * 2 * dp_size,
        "global_batch_size": int((mask.sum(-1) > 0).sum()) * 2 * dp_size,
        "loss_scale_factor": 12,
    }


VERL_AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def verl_batch_with_outliers(seed: int):
    """verl_batch plus tokens far off-policy both ways (r >> 3 and r << 1), so dual clip,
    DPPO's truncation at clip_ratio_c = 3 and CISPO's lower clip all bind."""
    old, logp, adv, mask = verl_batch(seed=seed)
    old = old.clone()
    old[0, :4] = logp[0, :4] - torch.tensor([1.5, 2.0, -1.5, 0.05], dtype=old.dtype)  # r = e^1.5, e^2, e^-1.5, ~1
    old[2, :3] = logp[2, :3] - torch.tensor([1.3, -2.0, 1.2], dtype=old.dtype)
    old = old.clamp(max=0)
    adv = adv.clone()
    adv[2] = -adv[2].abs()  # a negative-advantage row with r > 3: dual clip binds
    adv[0] = adv[0].abs()
    return old, logp, adv, mask


@pytest.mark.parametrize("agg", VERL_AGG)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("with_is_weights", [False, True])
@pytest.mark.parametrize("clip", ["verl_default", "clip_higher"])
def test_grpo_matches_verl_vanilla_ppo(agg, global_info, with_is_weights, clip):
    """Our `grpo` at verl's defaults (dual clip at clip_ratio_c = 3) is verl's `vanilla`: loss,
    gradient, verl's aggregation (with the global-batch normalization of a data-parallel
    micro-batch) and rollout IS weights all agree."""
    old, logp, adv, mask = verl_batch_with_outliers(seed=11)
    config = actor_config() if clip == "verl_default" else actor_config(clip_ratio_high=0.28)
    assert plugin.method_params("grpo", config)["dual_clip"] == 3.0
    r = torch.exp(logp - old)
    assert ((adv < 0) & (r > 3) & mask).any()  # the dual clip binds
    if global_info:
        config.global_batch_info.update(_global_info(mask))
    weights = None
    if with_is_weights:
        weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5), dtype=old.dtype) * 2
    ours = call(get_policy_loss_fn("grpo"), old, logp, adv, mask, agg, config, weights)
    theirs = call(get_policy_loss_fn("vanilla"), old, logp, adv, mask, agg, config, weights)
    rtol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12  # verl divides by count + 1e-8
    torch.testing.assert_close(ours[0], theirs[0], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=rtol, atol=1e-12)
    assert theirs[1].abs().sum() > 0


def _drpo_is_weighted_reference(old, logp, adv, mask, weights, delta):
    """Hand-written float64 reference: DRPO's per-token -J from its formula (docs/design.md, section 1),
    times the IS weight, token-mean over the mask."""
    r = torch.exp(logp - old)
    j = r * adv - adv.abs() * torch.exp(old) * (r - 1) ** 2 / (2 * delta)
    return torch.where(mask, -j * weights, torch.zeros_like(j)).sum() / mask.sum()


def test_rollout_is_weights_multiply_the_per_token_loss():
    old, logp, adv, mask = verl_batch(seed=21)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(6), dtype=old.dtype) * 2
    config = actor_config(policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"delta": 0.3}))
    got, grad, _ = call(get_policy_loss_fn("drpo"), old, logp, adv, mask, "token-mean", config, weights)
    ref_logp = logp.clone().requires_grad_(True)
    ref = _drpo_is_weighted_reference(old, ref_logp, adv, mask, weights, delta=0.3)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dppo_tv", "dppo_kl", "cispo"])
@pytest.mark.parametrize("config_kwargs", [{}, dict(clip_ratio_low=0.1, clip_ratio_high=0.15, clip_ratio_c=2.5)])
@pytest.mark.parametrize("agg", VERL_AGG)
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_loss_and_gradient_match_verls_own_losses(method, config_kwargs, agg, with_is_weights):
    """At verl's default ActorConfig ({}), and at other values of the same keys, our
    drpo_dppo_tv / drpo_dppo_kl / drpo_cispo give the loss value and the gradient of verl's
    dppo_tv / dppo_kl / cispo (verl's own functions, same inputs): same masks, DPPO's truncated
    ratio sg(min(r, clip_ratio_c)), CISPO's two-sided clip; the value is verl's
    -A*sg(w)*log pi, not drpo's DPPO surrogate -A*M*min(r, c). verl's Binary-KL adds 1e-8 inside
    its logs, ours is exact: the data keep every token's KL away from the thresholds."""
    old, logp, adv, mask = verl_batch_with_outliers(seed=31)
    config = actor_config(**config_kwargs)
    config.global_batch_info.update(_global_info(mask))
    weights = None
    if with_is_weights:
        weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(7), dtype=old.dtype) * 2
    loss_ours, grad_ours, metrics = call(
        get_policy_loss_fn(plugin.VERL_LOSS_NAMES[method]), old, logp, adv, mask, agg, config, weights
    )
    loss_verl, grad_verl, _ = call(get_policy_loss_fn(method), old, logp, adv, mask, agg, config, weights)
    rtol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12  # verl divides by count + 1e-8
    torch.testing.assert_close(grad_ours, grad_verl, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(loss_ours, loss_verl, rtol=rtol, atol=1e-12)
    assert grad_verl.abs().sum() > 0 and abs(float(loss_verl)) > 1e-3
    # the test must exercise the masks / clips and the truncation
    r = torch.exp(logp - old)
    assert ((r > config.clip_ratio_c) & mask).any() and ((r < 1 - config.clip_ratio_low) & mask).any()
    if method == "cispo":  # both clips: w = (1+eps_high)/r < 1 above, (1-eps_low)/r > 1 below
        assert metrics["actor/drpo/weight_attenuated_frac"] > 0 and metrics["actor/drpo/weight_amplified_frac"] > 0
    else:  # masked (w = 0) and truncated (0 < w < 1) tokens
        assert metrics["actor/drpo/weight_zero_frac"] > 0 and metrics["actor/drpo/weight_attenuated_frac"] > 0


VERL_TWIN = {"grpo": "vanilla", "dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl"}


@pytest.mark.parametrize("method", sorted(VERL_TWIN))
def test_a_config_without_clip_ratio_c_falls_back_as_verls_own_loss(method):
    """verl's vanilla and dppo losses read clip_ratio_c as `config.get("clip_ratio_c", <fallback>)`;
    a config without the key (an OmegaConf mapping, where verl's dataclass would have filled in
    its default) gives our twin verl's own loss and gradient on that same config. The fallback
    matters on this batch wherever it is not the dataclass default: verl's dppo losses at the
    dataclass default give another gradient."""
    from omegaconf import OmegaConf

    old, logp, adv, mask = verl_batch_with_outliers(seed=31)
    keys = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, global_batch_info={})
    config = OmegaConf.create(keys)
    assert "clip_ratio_c" not in config
    loss_ours, grad_ours, _ = call(get_policy_loss_fn(plugin.VERL_LOSS_NAMES[method]), old, logp, adv, mask,
                                   "token-mean", config)
    loss_verl, grad_verl, _ = call(get_policy_loss_fn(VERL_TWIN[method]), old, logp, adv, mask, "token-mean", config)
    torch.testing.assert_close(grad_ours, grad_verl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_ours, loss_verl, rtol=1e-12, atol=1e-12)
    dataclass_default = FSDPActorConfig.__dataclass_fields__["clip_ratio_c"].default
    at_default = OmegaConf.create({**keys, "clip_ratio_c": dataclass_default})
    _, grad_at_default, _ = call(get_policy_loss_fn(VERL_TWIN[method]), old, logp, adv, mask, "token-mean", at_default)
    if method.startswith("dppo"):
        assert (grad_at_default - grad_verl).abs().max() > 1e-3  # verl's dppo fallback (20) is not the default
    else:
        torch.testing.assert_close(grad_at_default, grad_verl, rtol=0, atol=0)  # vanilla's fallback is the default


# ---------------------------------------------------------------- bad input
def test_bad_input_is_named():
    old, logp, adv, mask = verl_batch(seed=41)
    fn = get_policy_loss_fn("drpo")
    with pytest.raises(ValueError, match="loss_agg_mode 'seq-sum'"):
        call(fn, old, logp, adv, mask, "seq-sum", actor_config())
    with pytest.raises(ValueError, match="verl must pass the actor config"):
        call(fn, old, logp, adv, mask, "token-mean", None)
    bad = actor_config(policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"detla": 0.1}))
    with pytest.raises(ValueError, match="'detla'"):
        call(fn, old, logp, adv, mask, "token-mean", bad)
    with pytest.raises(ValueError, match="`token_weights` shape \\(2, 2\\) does not broadcast"):
        call(fn, old, logp, adv, mask, "token-mean", actor_config(), torch.ones(2, 2, dtype=old.dtype))
    neg = torch.ones_like(old)
    neg[0, 0] = -1.0
    with pytest.raises(ValueError, match="rollout_is_weights are drpo's .*token_weights`? must be finite and >= 0"):
        call(fn, old, logp, adv, mask, "token-mean", actor_config(), neg)
    nan_logp = logp.clone()
    nan_logp[0, 0] = float("nan")
    strict = actor_config(policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"strict": True}))
    with pytest.raises(ValueError, match="`logp` has a non-finite value nan at response position \\(0, 0\\)"):
        call(fn, old, nan_logp, adv, mask, "token-mean", strict)
    not_bool = actor_config(policy_loss=plugin.DRPOPolicyLossConfig(loss_mode="drpo", drpo_params={"strict": "yes"}))
    with pytest.raises(ValueError, match="drpo_params.strict must be true or false"):
        call(fn, old, logp, adv, mask, "token-mean", not_bool)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        call(fn, old, logp, adv, mask, "seq-mean-token-sum-norm", actor_config(loss_scale_factor=0))


# ---------------------------------------------------------------- the example launch script
def test_launch_script_config_passes_verls_validation():
    """The example recipe's overrides, composed by verl's real entry point (`--cfg job`,
    nothing launched), build verl's ActorConfig and pass verl's own validate_config."""
    from omegaconf import OmegaConf
    from verl.utils.config import validate_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    script = os.path.join(root, "examples", "verl", "run_drpo_qwen3_4b_dapo_math.sh")
    env = {**os.environ, "DRY_RUN": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = OmegaConf.create(out.stdout)
    validate_config(config=cfg, use_reference_policy=False, use_critic=False)

    from verl.utils.config import omega_conf_to_dataclass

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == "drpo"
    assert plugin.method_params("drpo", actor) == {"delta": 12.5, "advantage_weighted": True}
    assert actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert actor.loss_scale_factor == cfg.data.max_response_length
    # The paper's recipe: G=8, 64 prompts/step, 4 updates per rollout, T=1, rollout anchor, mean-centred A.
    assert cfg.actor_rollout_ref.rollout.n == 8
    assert cfg.data.train_batch_size == 64 and cfg.data.train_batch_size // actor.ppo_mini_batch_size == 4
    assert actor.ppo_epochs == 1
    assert cfg.actor_rollout_ref.rollout.temperature == 1.0
    assert cfg.algorithm.rollout_correction.bypass_mode is True
    # the actor sees the rollout correction (bypass-mode rejection sampling reaches the loss)
    assert actor.policy_loss.rollout_correction["bypass_mode"] is True
    assert actor.policy_loss.rollout_correction["rollout_rs"] is None
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.norm_adv_by_std_in_grpo is False
    assert actor.use_kl_loss is False and actor.entropy_coeff == 0
    assert cfg.trainer.use_v1 is True  # the v1 trainer keeps loss_mode in bypass mode (v0 would replace it)
