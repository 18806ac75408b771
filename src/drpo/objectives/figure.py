"""`drpo weights`: every method's gradient weight against the probability shift D = pi - mu,
for several behaviour probabilities and both advantage signs (the paper's Table 1 / Figure 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from drpo.objectives.loss import gradient_weight

DEFAULT_MUS = (0.9, 0.5, 0.1, 0.01)
STYLE = {  # the figure's methods, in legend order
    "pg_is": dict(color="0.5", ls=":"),
    "grpo": dict(color="tab:orange"),
    "cispo": dict(color="tab:olive", ls="-."),
    "spo": dict(color="tab:red"),
    "dppo_tv": dict(color="tab:green", ls="--"),
    "dppo_kl": dict(color="tab:cyan", ls="--"),
    "drpo": dict(color="tab:blue", lw=2.4),
    "mask_drpo": dict(color="tab:purple", ls="-."),
}
FIGURE_METHODS = tuple(STYLE)


def figure_params(delta: float, spo_eps: float, clip_eps: float, dppo_delta: float, kl_delta: float) -> dict[str, dict]:
    return {
        "pg_is": {},
        "grpo": {"eps_low": clip_eps, "eps_high": clip_eps},
        "cispo": {"eps_high": clip_eps},
        "spo": {"eps": spo_eps},
        "dppo_tv": {"delta_low": dppo_delta, "delta_high": dppo_delta},
        "dppo_kl": {"delta_low": kl_delta, "delta_high": kl_delta},
        "drpo": {"delta": delta},
        "mask_drpo": {"delta": delta},
    }


def weight_curve(method: str, mu: float, sign: float, params: dict, n: int = 801) -> tuple[torch.Tensor, torch.Tensor]:
    """D = pi - mu over the whole simplex edge (pi in (0, 1]) and the weight there."""
    pi = torch.linspace(1e-6, 1.0, n, dtype=torch.float64)
    mu_t = torch.full_like(pi, mu)
    w = gradient_weight(method, torch.log(pi), torch.log(mu_t), torch.full_like(pi, sign), **params)
    return pi - mu, w


def weight_table(mus, params: dict, shifts=(-0.3, -0.1, 0.05, 0.1, 0.2, 0.3)) -> str:
    """Plain-text table of w at selected (mu, D) points for A > 0."""
    rows = []
    header = f"{'method':<10} {'mu':>5} " + " ".join(f"{'D=' + format(d, '+.2f'):>8}" for d in shifts)
    rows.append(header)
    rows.append("-" * len(header))
    for method in FIGURE_METHODS:
        for mu in mus:
            cells = []
            for d in shifts:
                pi = mu + d
                if not 0 < pi <= 1:
                    cells.append(f"{'-':>8}")
                    continue
                logp, old_logp = torch.tensor([[pi], [mu]], dtype=torch.float64).log()
                w = gradient_weight(method, logp, old_logp, torch.ones(1, dtype=torch.float64), **params[method])
                cells.append(f"{float(w):>8.3f}")
            rows.append(f"{method:<10} {mu:>5g} " + " ".join(cells))
    return "\n".join(rows)


def draw(out: Path, mus, params: dict, ylim=(-1.5, 2.5)) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(mus), 7.2))
    axes = fig.subplots(2, len(mus), sharey=True)
    for row, sign in enumerate((1.0, -1.0)):
        for col, mu in enumerate(mus):
            ax = axes[row][col]
            for method in FIGURE_METHODS:
                d, w = weight_curve(method, mu, sign, params[method])
                ax.plot(d.numpy(), w.clamp(*ylim).numpy(), label=method, **STYLE[method])
            boundary = sign * params["drpo"]["delta"]
            if -mu <= boundary <= 1 - mu:
                ax.axvline(boundary, color="k", lw=0.8, ls="--")
                ax.annotate("TV boundary\nD = sign(A)·δ", (boundary, ylim[1] - 0.1), fontsize=7,
                            ha="left" if sign > 0 else "right", va="top")
            ax.axhline(0, color="k", lw=0.5)
            ax.axhline(1, color="0.7", lw=0.5)
            ax.set_xlim(-mu, 1 - mu)
            ax.set_ylim(*ylim)
            ax.set_title(f"μ = {mu:g}, A {'> 0' if sign > 0 else '< 0'}", fontsize=10)
            ax.set_xlabel("probability shift D = π − μ")
            if col == 0:
                ax.set_ylabel("gradient weight w (clipped to axis)")
            ax.grid(alpha=0.25)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(FIGURE_METHODS), frameon=False)
    p = params
    fig.suptitle(
        "Gradient weight w per sampled token (∇J = A·r·w·∇log π).  "
        f"δ_DRPO = {p['drpo']['delta']:g}, δ_TV = {p['dppo_tv']['delta_high']:g}, "
        f"δ_KL = {p['dppo_kl']['delta_high']:g}, ε_SPO = {p['spo']['eps']:g}, ε_clip = {p['grpo']['eps_high']:g}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def run(args: argparse.Namespace) -> int:
    for name, value in (("--delta", args.delta), ("--spo-eps", args.spo_eps), ("--clip-eps", args.clip_eps),
                        ("--dppo-delta", args.dppo_delta), ("--kl-delta", args.kl_delta)):
        if not value > 0:
            raise SystemExit(f"drpo weights: {name} must be > 0, got {value}")
    mus = tuple(args.mu)
    for mu in mus:
        if not 0 < mu <= 1:
            raise SystemExit(f"drpo weights: --mu values must lie in (0, 1], got {mu}")
    params = figure_params(args.delta, args.spo_eps, args.clip_eps, args.dppo_delta, args.kl_delta)
    print(weight_table(mus, params))
    out = draw(Path(args.out), mus, params)
    print(f"\nwrote {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "weights",
        help="plot every method's gradient weight against the probability shift pi - mu",
        description=__doc__,
    )
    p.add_argument("--out", default="weights.png", help="PNG path (default: weights.png)")
    p.add_argument("--mu", type=float, nargs="+", default=list(DEFAULT_MUS), help="behaviour probabilities, one column each")
    # Matched thresholds by default so the boundaries line up; the library default delta=12.5
    # gives weights within [0.92, 1.08], visible with --delta 12.5.
    p.add_argument("--delta", type=float, default=0.15, help="DRPO / Mask-DRPO threshold (default 0.15, = DPPO-TV's)")
    p.add_argument("--dppo-delta", type=float, default=0.15, help="DPPO Binary-TV threshold")
    p.add_argument("--kl-delta", type=float, default=0.05, help="DPPO Binary-KL threshold")
    p.add_argument("--spo-eps", type=float, default=0.15, help="SPO epsilon")
    p.add_argument("--clip-eps", type=float, default=0.2, help="GRPO / CISPO clip epsilon")
    p.set_defaults(run=run)
