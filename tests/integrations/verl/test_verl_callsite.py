"""drpo's verl losses where verl's workers call them, at verl's default configuration.

- Thresholds: verl's default ActorConfig, composed from verl's own default YAML by its Hydra
  config and turned into the dataclass its workers receive, pins each method's parameters.
- The call site: verl 0.9.1's workers call a policy loss from `verl.workers.utils.losses.
  ppo_loss` (TensorDict inputs, no-padding -> padding conversion, global batch info,
  `loss_scale_factor`, `Metric` aggregation). We drive that function itself and compare with
  `policy_loss` on the same tokens, rescaled by verl's global-batch normalization (agg_loss).
- Non-finite inputs and bypass-mode rollout correction through verl's registry.
"""

from __future__ import annotations

import functools
import math
import os
import zlib

import pytest
import torch
import verl as verl_pkg
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.losses import ppo_loss

from drpo.integrations import verl as plugin
from drpo.objectives import METHODS, policy_loss

F64 = torch.float64
VERL_AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@functools.lru_cache(maxsize=None)
def _compose(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl_pkg.__file__), "trainer", "config")
    base = ["actor_rollout_ref.rollout.n=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=base + list(overrides))


def verl_actor(*overrides: str):
    """verl's actor config as its workers get it: verl's default YAML composed by Hydra, plus
    `overrides`, converted by verl's omega_conf_to_dataclass (a fresh object each call)."""
    return omega_conf_to_dataclass(_compose(tuple(overrides)).actor_rollout_ref.actor)


# ---------------------------------------------------------------- thresholds at verl's defaults
# What a verl user gets at verl's default ActorConfig (clip_ratio = clip_ratio_low =
# clip_ratio_high = 0.2, clip_ratio_c = 3.0) for each registered loss. README's method table
# states the same values.
VERL_DEFAULT_PARAMS = {
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": 3.0},
    "cispo": {"eps_low": 0.2, "eps_high": 0.2},
    "dppo_tv": {"delta_low": 0.2, "delta_high": 0.2, "ratio_cap": 3.0},
    "dppo_kl": {"delta_low": 0.2, "delta_high": 0.2, "ratio_cap": 3.0},
    "drpo": {"delta": 12.5, "advantage_weighted": True},
    "mask_drpo": {"delta": 12.5, "advantage_weighted": True},
    "spo": {"eps": 12.5, "advantage_weighted": True},
    "pg_is": {},
}


def test_verl_default_actor_config_is_what_we_assume():
    actor = verl_actor()
    assert (actor.clip_ratio, actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.2, 0.2, 3.0)
    assert actor.policy_loss.loss_mode == "vanilla" and actor.loss_agg_mode == "token-mean"


@pytest.mark.parametrize("method", sorted(VERL_DEFAULT_PARAMS))
def test_each_method_at_verls_default_actor_config(method):
    loss_mode = plugin.VERL_LOSS_NAMES[method]
    actor = verl_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}")
    assert plugin.method_params(method, actor) == VERL_DEFAULT_PARAMS[method]
    assert plugin.strict_mode(actor) is False


def test_drpo_params_win_over_verl_keys():
    actor = verl_actor(
        "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=drpo_dppo_kl",
        "+actor_rollout_ref.actor.policy_loss.drpo_params={delta_low:0.05,delta_high:0.05,strict:true}",
    )
    assert plugin.method_params("dppo_kl", actor) == {"delta_low": 0.05, "delta_high": 0.05, "ratio_cap": 3.0}
    assert plugin.strict_mode(actor) is True


def test_readme_table_states_the_same_values():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    table = readme[readme.index("| verl `loss_mode` |") :]
    table = table[: table.index("\n\n")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines()[2:]}
    for method, params in VERL_DEFAULT_PARAMS.items():
        row = rows[plugin.VERL_LOSS_NAMES[method]]
        for key, value in params.items():
            if isinstance(value, bool):
                continue
            assert f"{key}={value:g}" in row, (method, key, row)


# ---------------------------------------------------------------- verl's ppo_loss call site
def _sequences(seed: int):
    """Three sequences as verl's rollout stores them: prompt/response lengths, response mask
    with a masked span, rollout log-probs, token advantages, rollout IS weights; and the
    model's flattened (no-padding) per-token log-probs over prompt + response."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, resp_lens = [3, 1, 2], [4, 2, 6]
    flat = -torch.rand(sum(prompt_lens) + sum(resp_lens), generator=g, dtype=F64) * 2
    rows = []
    start = 0
    for p, r in zip(prompt_lens, resp_lens):
        # the model output is shifted left by one: response token t's log-prob sits at p - 1 + t
        idx = torch.arange(start + p - 1, start + p - 1 + r)
        mask = torch.ones(r, dtype=F64)
        if r == 6:
            mask[2:4] = 0  # e.g. tool output inside a multi-turn response
        old = (flat.detach()[idx] + torch.randn(r, generator=g, dtype=F64) * 0.4).clamp(max=0)
        adv = torch.full((r,), float(torch.randn(1, generator=g, dtype=F64)), dtype=F64)
        weights = torch.rand(r, generator=g, dtype=F64) * 2
        rows.append(dict(idx=idx, mask=mask, old=old, adv=adv, weights=weights, p=p, r=r))
        start += p + r
    return flat, rows


def _verl_data(flat, rows, pad_mode: str, dp_size, batch_num_tokens, global_batch_size) -> TensorDict:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 9, (row["p"],), generator=g) for row in rows]
    responses = [torch.randint(1, 9, (row["r"],), generator=g) for row in rows]
    fields = {k: [row[src] for row in rows] for k, src in
              (("response_mask", "mask"), ("old_log_probs", "old"), ("advantages", "adv"), ("rollout_is_weights", "weights"))}
    if pad_mode == "no_padding":  # nested (jagged) tensors, as verl's engines keep them
        nested = lambda xs: torch.nested.nested_tensor(xs, layout=torch.jagged)  # noqa: E731
        data = {"prompts": nested(prompts), "responses": nested(responses)} | {k: nested(v) for k, v in fields.items()}
    else:  # left-padded prompts, right-padded responses, attention mask over both
        P, R = max(row["p"] for row in rows), max(row["r"] for row in rows)
        pad = lambda xs, n, left=False: torch.stack(  # noqa: E731
            [torch.cat([x.new_zeros(n - len(x)), x]) if left else torch.cat([x, x.new_zeros(n - len(x))]) for x in xs]
        )
        attn = torch.cat(
            [pad([torch.ones(row["p"], dtype=torch.long) for row in rows], P, left=True),
             pad([torch.ones(row["r"], dtype=torch.long) for row in rows], R)], dim=1
        )
        data = {"prompts": pad(prompts, P, left=True), "responses": pad(responses, R), "attention_mask": attn}
        data |= {k: pad(v, R) for k, v in fields.items()}
    td = TensorDict(data, batch_size=[len(rows)])
    tu.assign_non_tensor(td, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    return td


def _padded(flat, rows, key):
    R = max(row["r"] for row in rows)
    out = torch.zeros(len(rows), R, dtype=F64)
    for i, row in enumerate(rows):
        out[i, : row["r"]] = flat[row["idx"]] if key == "logp" else row[key]
    return out


# verl's dppo losses write their value as -A*sg(w)*log pi, another value than drpo's surrogate with
# the same gradient; their drpo twins report verl's value (docs/integrations.md).
VERL_VALUE_TWIN = {"dppo_tv": "dppo_tv", "dppo_kl": "dppo_kl"}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("agg", VERL_AGG)
@pytest.mark.parametrize("pad_mode", ["no_padding", "padding"])
@pytest.mark.parametrize("dp", [1, 2])
def test_verl_ppo_loss_call_site(method, agg, pad_mode, dp):
    # a fixed case per parameter set: hash() of strings is salted per process, so it drew new
    # data on every run and a failure could not be reproduced
    flat, rows = _sequences(seed=zlib.crc32(f"{method}/{agg}".encode()) % 1000)
    mask = _padded(flat, rows, "mask") > 0
    n_tokens, n_seqs = int(mask.sum()), int((mask.sum(-1) > 0).sum())
    # dp=2: this micro-batch is a third of the tokens/sequences of each rank's mini-batch
    batch_num_tokens, global_batch_size = (None, None) if dp == 1 else (3 * n_tokens * dp, 3 * n_seqs * dp)
    data = _verl_data(flat, rows, pad_mode, dp, batch_num_tokens, global_batch_size)
    actor = verl_actor(
        f"actor_rollout_ref.actor.policy_loss.loss_mode={plugin.VERL_LOSS_NAMES[method]}",
        f"actor_rollout_ref.actor.loss_agg_mode={agg}",
        "actor_rollout_ref.actor.loss_scale_factor=7",
    )
    x = flat.clone().requires_grad_(True)
    loss, metrics = ppo_loss(actor, {"log_probs": x}, data)
    (grad,) = torch.autograd.grad(loss, x)

    # Reference: policy_loss on the padded tokens, times verl's agg_loss normalization.
    y = flat.clone().requires_grad_(True)
    logp = _padded(y, rows, "logp")
    old, adv, w = (_padded(flat, rows, k) for k in ("old", "adv", "weights"))
    drpo_agg = "token-mean" if agg == "token-sum" else agg
    ref, ref_metrics = policy_loss(
        method, logp, old, adv, mask, agg=drpo_agg, horizon=7, token_weights=w, **plugin.method_params(method, actor)
    )
    if agg == "token-sum":
        scale = n_tokens * dp
    elif dp == 1:
        scale = 1.0
    elif agg == "token-mean":
        scale = n_tokens * dp / batch_num_tokens
    else:
        scale = n_seqs * dp / global_batch_size
    ref = ref * scale
    (ref_grad,) = torch.autograd.grad(ref, y)
    value = ref.detach()
    if method in VERL_VALUE_TWIN:  # the value is verl's own loss's, on the global info ppo_loss set in `actor`
        value, _ = get_policy_loss_fn(VERL_VALUE_TWIN[method])(
            old_log_prob=old, log_prob=logp.detach(), advantages=adv, response_mask=mask, loss_agg_mode=agg,
            config=actor, rollout_is_weights=w)

    rtol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12  # verl divides by count + 1e-8
    torch.testing.assert_close(loss.detach(), value, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-12)
    assert ref_grad.abs().sum() > 0
    assert metrics["actor/pg_loss"].aggregate() == pytest.approx(float(value), rel=rtol, abs=1e-12)
    for key in ("tokens", "ratio_mean", "kept_grad_mass", "weight_mean", "nonfinite_tokens"):
        assert metrics[plugin.METRIC_PREFIX + key].aggregate() == pytest.approx(ref_metrics[key], rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- non-finite rollout log-probs
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_minus_inf_rollout_logprob_is_dropped_and_counted(method):
    """verl's own losses carry on past a -inf rollout log-prob; ours drop the token, keep the
    loss and gradients finite and report it, through verl's registry and default config."""
    flat, rows = _sequences(seed=5)
    mask = _padded(flat, rows, "mask") > 0
    old, adv = _padded(flat, rows, "old"), _padded(flat, rows, "adv")
    old[1, 1] = -math.inf
    logp = _padded(flat, rows, "logp").requires_grad_(True)
    actor = verl_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={plugin.VERL_LOSS_NAMES[method]}")
    fn = get_policy_loss_fn(plugin.VERL_LOSS_NAMES[method])
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=actor)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[1, 1] == 0
    assert metrics["actor/drpo/nonfinite_tokens"] == 1
    assert metrics["actor/drpo/tokens"] == int(mask.sum()) - 1
    kept = mask.clone()
    kept[1, 1] = False
    finite_old = old.nan_to_num(neginf=-1.0)
    ref, _ = policy_loss(method, logp, finite_old, adv, kept, **plugin.method_params(method, actor))
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    if method in VERL_VALUE_TWIN:  # the value is verl's own loss's on the kept tokens
        ref, _ = get_policy_loss_fn(VERL_VALUE_TWIN[method])(
            old_log_prob=finite_old, log_prob=logp.detach(), advantages=adv, response_mask=kept, config=actor)
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    strict = verl_actor(
        "actor_rollout_ref.actor.policy_loss._target_=drpo.integrations.verl.DRPOPolicyLossConfig",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={plugin.VERL_LOSS_NAMES[method]}",
        "+actor_rollout_ref.actor.policy_loss.drpo_params={strict:true}",
    )
    with pytest.raises(ValueError, match="`old_logp` has a non-finite value -inf at response position \\(1, 1\\)"):
        fn(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, config=strict)


# ---------------------------------------------------------------- bypass-mode rollout correction
BYPASS = (
    "algorithm.rollout_correction.bypass_mode=True",
    "algorithm.rollout_correction.rollout_is=null",
    "+actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}",
)


def _bypass_actor(loss_mode: str, *extra: str):
    cfg = _compose((f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", *BYPASS, *extra))
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_bypass_rejection_sampling_is_applied_as_verl_applies_it():
    """verl's `bypass_mode` loss (what verl's legacy trainer runs in bypass mode) applies the
    rollout_rs rejection mask, then PPO-clip. Our grpo, at the same config through the config
    wiring the example script uses, gives the same loss and gradient; without rejection it
    differs (the rejection is exercised)."""
    flat, rows = _sequences(seed=9)
    mask = _padded(flat, rows, "mask") > 0
    old, adv = _padded(flat, rows, "old"), _padded(flat, rows, "adv")
    logp = _padded(flat, rows, "logp")
    rs = ("algorithm.rollout_correction.rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs_threshold='0.7_1.4'")
    ours = _bypass_actor("grpo", *rs)
    assert ours.policy_loss.rollout_correction["rollout_rs"] == "token_k1"
    verls = _bypass_actor("bypass_mode", *rs)

    def run(name, actor):
        x = logp.clone().requires_grad_(True)
        loss, metrics = get_policy_loss_fn(name)(
            old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=actor
        )
        return loss, torch.autograd.grad(loss, x)[0], metrics

    loss, grad, metrics = run("grpo", ours)
    ref_loss, ref_grad, ref_metrics = run("bypass_mode", verls)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    rejected = [k for k in ref_metrics if "rollout_rs" in k and "masked_fraction" in k]
    assert rejected and metrics[rejected[0]] == ref_metrics[rejected[0]] > 0
    no_rs, _, _ = run("grpo", _bypass_actor("grpo"))
    assert abs(float((no_rs - loss).detach())) > 1e-6


@pytest.mark.parametrize("threshold", ["0.7_1.4", "0.9_1.1"])
def test_bypass_rejection_keeps_the_tokens_the_configured_threshold_keeps(threshold):
    """token_k1 with rollout_rs_threshold "lower_upper" keeps a token iff lower <= mu/pi <= upper
    (mu the rollout probability, pi the current one; verl's rollout_corr_helper). Our grpo, given
    the threshold only through the config, equals drpo's own policy_loss on exactly the tokens that
    closed form keeps, and the rejected tokens get no gradient; each threshold rejects some
    tokens and keeps others, a different set for each."""
    flat, rows = _sequences(seed=9)
    mask = _padded(flat, rows, "mask") > 0
    old, adv, logp = _padded(flat, rows, "old"), _padded(flat, rows, "adv"), _padded(flat, rows, "logp")
    lower, upper = map(float, threshold.split("_"))
    mu_over_pi = torch.exp(old - logp)
    keep = mask & (mu_over_pi >= lower) & (mu_over_pi <= upper)
    assert keep.any() and (mask & ~keep).any()
    actor = _bypass_actor("grpo", "algorithm.rollout_correction.rollout_rs=token_k1",
                          f"algorithm.rollout_correction.rollout_rs_threshold='{threshold}'")
    x = logp.clone().requires_grad_(True)
    loss, _ = get_policy_loss_fn("grpo")(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                         loss_agg_mode="token-mean", config=actor)
    (grad,) = torch.autograd.grad(loss, x)
    ref, _ = policy_loss("grpo", logp, old, adv, keep, **plugin.method_params("grpo", actor))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-12, atol=1e-12)
    assert (grad[mask & ~keep] == 0).all() and (grad[keep] != 0).any()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("algorithm.rollout_correction.rollout_is=token", "rollout_correction.rollout_is='token'"),
        ("algorithm.rollout_correction.loss_type=reinforce", "rollout_correction.loss_type='reinforce'"),
    ],
)
def test_bypass_settings_drpo_cannot_honour_are_refused(override, match):
    flat, rows = _sequences(seed=9)
    mask = _padded(flat, rows, "mask") > 0
    actor = _bypass_actor("drpo", override)
    with pytest.raises(ValueError, match=match):
        get_policy_loss_fn("drpo")(
            old_log_prob=_padded(flat, rows, "old"), log_prob=_padded(flat, rows, "logp"),
            advantages=_padded(flat, rows, "adv"), response_mask=mask, config=actor,
        )


# ---------------------------------------------------------------- host syncs per call
class _CountHostSyncs(torch.overrides.TorchFunctionMode):
    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_host_sync_per_call_through_verls_registry(method):
    """Our losses read their metrics (and input checks) in one transfer; verl's vanilla loss,
    measured the same way, makes three (`.item()` per metric)."""
    flat, rows = _sequences(seed=2)
    mask = _padded(flat, rows, "mask") > 0
    args = dict(old_log_prob=_padded(flat, rows, "old"), advantages=_padded(flat, rows, "adv"), response_mask=mask)
    actor = verl_actor(f"actor_rollout_ref.actor.policy_loss.loss_mode={plugin.VERL_LOSS_NAMES[method]}")
    for name, expected in ((plugin.VERL_LOSS_NAMES[method], 1), ("vanilla", 3)):
        x = _padded(flat, rows, "logp").requires_grad_(True)
        with _CountHostSyncs() as counter:
            loss, _ = get_policy_loss_fn(name)(log_prob=x, config=actor, **args)
            loss.backward()
        assert len(counter.calls) == expected, (name, counter.calls)
