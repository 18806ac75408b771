"""Built-in grids.

- `quick`: a few minutes on 2 CPU cores; first contact. Three objectives (a ratio method,
  the DPPO mask and DRPO) on-policy and with stale rollouts (4 updates per batch), one seed.
- `paper-mini`: the study behind docs/results/ (about an hour on 2 CPU cores): the seven
  objectives of the paper under on-policy fp32, bf16 / fp8 rollouts, fp8 end to end, stale
  rollouts with several updates per batch and a large-learning-rate stress setting, three
  seeds; plus DRPO's threshold sweep and the |A| ablation in the stale setting.

Objective parameters used by both (stated in the report): DRPO and Mask-DRPO use
delta = 0.15, the same Binary-TV threshold as dppo_tv, so the three share a boundary (the
paper's comparison; DRPO's registered default 12.5 is swept separately), and SPO uses
eps = 0.2, the same ratio radius as GRPO's clip. Other methods use their registered defaults.
"""

from __future__ import annotations

from drpo.study.grid import Grid, parse_grid

# one trust-region radius for the whole comparison (see the module docstring)
DELTA = 0.15
METHODS = [
    "pg_is",
    "grpo",
    {"name": "spo", "method": "spo", "params": {"eps": 0.2}},
    "dppo_tv",
    "dppo_kl",
    {"name": "drpo", "method": "drpo", "params": {"delta": DELTA}},
    {"name": "mask_drpo", "method": "mask_drpo", "params": {"delta": DELTA}},
]

# The trainer's tiny default model on 2-digit addition, sized so one run takes well under a
# minute of one CPU core. An 800-step warm start (trained once, cached and shared by every
# run) starts RL from ~75% greedy accuracy (seed 0), so both gains and collapses are
# measurable. lr 1e-4: in probe grids with bf16 rollouts and 4 updates per batch, 1e-3 took
# every probed method to 0% within 5 steps and 3e-4 collapsed them all (docs/results).
_BASE = {
    "warmstart.steps": 800,
    "rollout.prompts_per_step": 8,
    "rollout.n_samples": 8,
    "optim.lr": 1e-4,
    "train.steps": 30,
    "train.eval_every": 5,
    "train.save_every": 10,
}

SETTINGS = {
    "fp32": {"rollout.precision": "fp32"},
    "bf16": {"rollout.precision": "bf16"},
    "fp8": {"rollout.precision": "fp8_e4m3"},
    "fp8_e2e": {"rollout.precision": "fp8_e2e"},
    "stale": {"rollout.precision": "fp32", "rollout.sync_every": 2, "optim.updates_per_rollout": 4},
    "stress": {"rollout.precision": "bf16", "optim.updates_per_rollout": 4, "optim.lr": 2e-4},
}
SETTING_NOTES = {
    "fp32": "on-policy: fp32 rollouts, one update per batch",
    "bf16": "bf16 rollout weights, fp32 training",
    "fp8": "fp8 (e4m3) rollout weights, fp32 training",
    "fp8_e2e": "fp8 rollout and fp8 training forward",
    "stale": "stale rollouts: weights synced every 2 steps, 4 updates per batch",
    "stress": "stress: bf16 rollouts, 4 updates per batch, 2x learning rate",
}

PAPER_MINI = {
    "name": "paper-mini",
    "description": (
        "Seven trust-region objectives x six mismatch settings x three seeds on the tiny default model "
        "(2-digit addition), plus DRPO's threshold sweep and the |A| ablation under stale rollouts."
    ),
    "base": dict(_BASE),
    "settings": SETTINGS,
    "setting_notes": SETTING_NOTES,
    "methods": METHODS,
    "seeds": [0, 1, 2],
    "sweeps": [
        {
            "settings": ["stale"],
            "variants": [
                {"name": "drpo-d0.05", "method": "drpo", "params": {"delta": 0.05}},
                {"name": "drpo-d1", "method": "drpo", "params": {"delta": 1.0}},
                {"name": "drpo-d12.5", "method": "drpo", "params": {"delta": 12.5}},
                {"name": "drpo-noadv", "method": "drpo", "params": {"delta": DELTA, "advantage_weighted": False}},
            ],
        }
    ],
}

QUICK = {
    "name": "quick",
    "description": "Smoke-sized comparison: GRPO, DPPO-TV and DRPO on-policy and with stale rollouts, one seed.",
    "base": {**_BASE, "train.steps": 10, "train.eval_every": 5},
    "settings": {k: SETTINGS[k] for k in ("fp32", "stale")},
    "setting_notes": {k: SETTING_NOTES[k] for k in ("fp32", "stale")},
    "methods": ["grpo", "dppo_tv", {"name": "drpo", "method": "drpo", "params": {"delta": DELTA}}],
    "seeds": [0],
}

PRESETS = {"quick": QUICK, "paper-mini": PAPER_MINI}


def get_preset(name: str) -> Grid:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return parse_grid(PRESETS[name], source=f"preset {name!r}")
