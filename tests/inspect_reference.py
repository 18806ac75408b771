"""An independent float64 recomputation of `drpo inspect`'s numbers from a dump, for the tests:
the dump read with plain pyarrow (`to_pylist`, not drpo's reader) and every method's weight and
boundary written here from the closed forms (the DESIGN table), in numpy, not drpo's code.

    python tests/inspect_reference.py DUMP_DIR REPORT.json   # check a report against its dump
"""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

BUCKETS = ("<=0.01", "0.01-0.1", "0.1-0.5", ">0.5")
DEFAULTS = {
    "pg_is": {},
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": math.inf},
    "cispo": {"eps_low": 1.0, "eps_high": 0.2},
    "spo": {"eps": 12.5, "advantage_weighted": True},
    "dppo_tv": {"delta_low": 0.15, "delta_high": 0.15, "ratio_cap": math.inf},
    "dppo_kl": {"delta_low": 0.05, "delta_high": 0.05, "ratio_cap": math.inf},
    "drpo": {"delta": 12.5, "advantage_weighted": True},
    "mask_drpo": {"delta": 12.5, "advantage_weighted": True},
}


def weight_and_boundary(method: str, p: dict, logp, old, adv):
    """(w, beyond) per token from the closed forms, float64."""
    r = np.exp(np.clip(logp - old, -20, 20))
    pi, mu = np.exp(logp), np.exp(old)
    d = pi - mu
    sgn = np.sign(adv)
    pos, neg = adv > 0, adv < 0
    if method == "pg_is":
        return np.ones_like(r), np.zeros(r.shape, bool)
    if method == "grpo":
        out = (pos & (r > 1 + p["eps_high"])) | (neg & ((r < 1 - p["eps_low"]) | (r > p["dual_clip"])))
        return 1.0 - out, out
    if method == "cispo":
        return np.clip(r, 1 - p["eps_low"], 1 + p["eps_high"]) / r, (adv != 0) & ((r > 1 + p["eps_high"]) | (r < 1 - p["eps_low"]))
    if method == "spo":
        assert p["advantage_weighted"]
        return 1 - sgn * (r - 1) / p["eps"], (pos & (r - 1 > p["eps"])) | (neg & (r - 1 < -p["eps"]))
    if method in ("dppo_tv", "dppo_kl"):
        if method == "dppo_tv":
            out = (pos & (d > p["delta_high"])) | (neg & (d < -p["delta_low"]))
        else:
            with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log(0 / x) = 0 (mu = 1)
                kl = mu * np.log(mu / pi) + np.where(mu < 1, (1 - mu) * np.log((1 - mu) / (1 - pi)), 0.0)
            out = (pos & (d > 0) & (kl > p["delta_high"])) | (neg & (d < 0) & (kl > p["delta_low"]))
        return (1.0 - out) * np.minimum(r, p["ratio_cap"]) / r, out
    if method in ("drpo", "mask_drpo"):
        assert p["advantage_weighted"]
        out = (pos & (d > p["delta"])) | (neg & (d < -p["delta"]))
        w = 1 - sgn * d / p["delta"]
        return (np.where(out, w, 1.0) if method == "mask_drpo" else w), out
    raise KeyError(method)


def read_tokens(paths):
    """Flat float64 arrays of the response tokens of every row (plain pyarrow)."""
    cols = {k: [] for k in ("step", "rollout", "before", "after", "adv")}
    for path in paths:
        for row in pq.read_table(path).to_pylist():
            m = np.array(row["response_mask"], bool)
            cols["step"].append(np.full(m.sum(), row["step"]))
            for key, name in (("rollout", "logp_rollout"), ("before", "logp_before"), ("after", "logp_after"),
                              ("adv", "advantage")):
                v = row.get(name)
                cols[key].append(np.array(v, np.float64)[m] if v is not None else np.full(m.sum(), np.nan))
    return {k: np.concatenate(v) for k, v in cols.items()}


def reference(paths, variants: list[dict], policy: str = "auto") -> dict:
    """{"total": ..., "steps": {step: ...}} with the report.json's keys, in float64."""
    t = read_tokens(paths)
    has_rollout = not np.isnan(t["rollout"]).all()
    use_after = policy in ("auto", "after") and not np.isnan(t["after"]).all()
    logp = t["after"] if use_after else t["before"]
    unscored = np.isnan(t["rollout"]) if has_rollout else np.zeros(t["before"].shape, bool)
    anchor = np.where(unscored, t["before"], t["rollout"]) if has_rollout else t["before"]
    mu = np.exp(anchor)
    bucket = np.where(mu <= 0.01, 0, np.where(mu <= 0.1, 1, np.where(mu <= 0.5, 2, 3)))
    adv = t["adv"]

    def summary(sel):
        out = {"tokens": int(sel.sum()), "long_tail_share": float((sel & (mu <= 0.01)).sum() / sel.sum()),
               "mismatch": {}, "methods": {}}
        for name, bsel in (("all", sel), *((b, sel & (bucket == k)) for k, b in enumerate(BUCKETS))):
            if has_rollout and (bsel & ~unscored).any():
                lr = (t["before"] - anchor)[bsel & ~unscored]
                out["mismatch"][name] = {"mean_log_ratio": lr.mean(), "mean_abs_log_ratio": np.abs(lr).mean(),
                                         "k3_kl": (np.exp(lr) - 1 - lr).mean(), "tokens": int(bsel.sum())}
        for v in variants:
            w, beyond = weight_and_boundary(v["method"], v["params"], logp, anchor, adv)
            r = np.exp(np.clip(logp - anchor, -20, 20))
            per = {}
            for name, bsel in (("all", sel), *((b, sel & (bucket == k)) for k, b in enumerate(BUCKETS))):
                pos, neg, car = bsel & (adv > 0), bsel & (adv < 0), bsel & (adv != 0)
                frac = lambda a, b: float(a.sum() / b.sum()) if b.sum() else 0.0  # noqa: E731
                den = np.abs(adv * r)[bsel].sum()
                per[name] = {
                    "tokens": int(bsel.sum()),
                    "beyond_boundary_pos_frac": frac(beyond & pos, pos),
                    "beyond_boundary_neg_frac": frac(beyond & neg, neg),
                    "zeroed_frac": frac(car & (w == 0), car),
                    "attenuated_frac": frac(car & (w > 0) & (w < 1), car),
                    "corrective_frac": frac(car & (w < 0), car),
                    "amplified_frac": frac(car & (w > 1), car),
                    "kept_grad_mass": float(np.abs(adv * r * w)[bsel].sum() / den) if den > 0 else 1.0,
                }
            out["methods"][v["label"]] = per
        return out

    return {"total": summary(np.ones(adv.shape, bool)),
            "steps": {str(int(s)): summary(t["step"] == s) for s in np.unique(t["step"])}}


def compare(report: dict, ref: dict, rel: float = 1e-9) -> int:
    """Asserts every reference number equals the report's; returns how many were compared."""
    n = 0

    def close(a, b, where):
        nonlocal n
        n += 1
        assert a is not None and abs(a - b) <= rel * max(1.0, abs(b)), f"{where}: report {a!r} != reference {b!r}"

    for scope in ("total", *(f"steps.{s}" for s in ref["steps"])):
        got = report["total"] if scope == "total" else report["steps"][scope.split(".")[1]]
        want = ref["total"] if scope == "total" else ref["steps"][scope.split(".")[1]]
        assert got["tokens"] == want["tokens"], scope
        close(got["long_tail_share"], want["long_tail_share"], f"{scope}.long_tail_share")
        for b, m in want["mismatch"].items():
            for k in ("mean_log_ratio", "mean_abs_log_ratio", "k3_kl"):
                close(got["mismatch"][b][k], m[k], f"{scope}.mismatch.{b}.{k}")
        for label, per in want["methods"].items():
            for b, s in per.items():
                for k, v in s.items():
                    close(got["methods"][label][b][k], v, f"{scope}.{label}.{b}.{k}")
    return n


def variants_of(report: dict) -> list[dict]:
    out = []
    for v in report["variants"]:
        params = {k: (math.inf if x is None else x) for k, x in v["params"].items()}  # JSON has no inf
        out.append({"label": v["label"], "method": v["method"], "params": params})
    return out


def main(argv):
    dump, report_path = argv
    report = json.loads(Path(report_path).read_text())
    paths = sorted(glob.glob(str(Path(dump) / "**" / "*.parquet"), recursive=True)) if Path(dump).is_dir() else [dump]
    policy = "after" if report["policy"] == ["after"] else "before"
    n = compare(report, reference(paths, variants_of(report), policy))
    print(f"{n} numbers of {report_path} equal the float64 reference recomputed from {len(paths)} dump file(s)")


if __name__ == "__main__":
    main(sys.argv[1:])
