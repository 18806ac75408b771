"""An independent float64 recomputation of every number in `drpo inspect`'s report.json, for
the tests. It takes nothing from the report it checks: the dump is read with plain pyarrow
(`to_pylist`, not drpo's reader), the methods and swept parameters come from the command line
`drpo inspect` was given (parsed here, with the documented defaults and labels), and every
method's weight and boundary is written from the closed forms (docs/design.md) in numpy, not
drpo's code. `compare` walks the whole report: a number the reference does not recompute fails.

    python tests/inspect_reference.py DUMP_DIR REPORT.json [--method M]... [--param M.K=V,...]... [--policy P]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

BUCKETS = ("<=0.01", "0.01-0.1", "0.1-0.5", ">0.5")
EDGES = (0.01, 0.1, 0.5)  # right-closed: mu <= 0.01 is the long tail
DEFAULTS = {  # every built-in in registration order, at its documented defaults
    "pg_is": {},
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": math.inf},
    "cispo": {"eps_low": 1.0, "eps_high": 0.2},
    "spo": {"eps": 12.5, "advantage_weighted": True},
    "dppo_tv": {"delta_low": 0.15, "delta_high": 0.15, "ratio_cap": math.inf},
    "dppo_kl": {"delta_low": 0.05, "delta_high": 0.05, "ratio_cap": math.inf},
    "drpo": {"delta": 12.5, "advantage_weighted": True},
    "mask_drpo": {"delta": 12.5, "advantage_weighted": True},
}
# the sanity header's documented thresholds (docs/inspect.md, "sanity header")
RATIO_MASS_TOL, SLOPE_TOL, SIGMAS = 0.01, 0.03, 5.0
TOP, CONTEXT = 20, 8  # disagreements kept, response tokens of context each side


def variants(methods=None, params=()) -> list[dict]:
    """What `drpo inspect --method M ... --param M.K=V1,V2 ...` compares: each method at its
    defaults, or at every combination of its swept values, labelled `m(k=v, ...)`."""
    names = list(methods) if methods else list(DEFAULTS)
    sweeps: dict[str, dict[str, list]] = {}
    for spec in params:
        key, _, raw = spec.partition("=")
        method, _, name = key.partition(".")
        values = [v.strip().lower() == "true" if v.strip().lower() in ("true", "false") else float(v) for v in raw.split(",")]
        if method not in names:
            names.append(method)
        sweeps.setdefault(method, {})[name] = values
    out = []
    for m in names:
        grid = sweeps.get(m, {})
        for combo in itertools.product(*grid.values()):
            given = dict(zip(grid, combo))
            label = m if not given else m + "(" + ", ".join(
                f"{k}={str(v).lower() if isinstance(v, bool) else f'{v:g}'}" for k, v in given.items()) + ")"
            out.append({"label": label, "method": m, "params": {**DEFAULTS[m], **given}})
    return out


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
    """Flat float64 arrays of the response tokens of every row (plain pyarrow), with where each
    token sits (file, row, position) and each row's token ids (-1 outside the response)."""
    cols = {k: [] for k in ("file", "row", "pos", "step", "rollout", "before", "after", "adv", "token")}
    seqs = {}
    for path in paths:
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            m = np.array(row["response_mask"], bool)
            k = int(m.sum())
            cols["file"].append(np.full(k, str(path), object))
            cols["row"].append(np.full(k, i))
            cols["pos"].append(np.nonzero(m)[0])
            cols["step"].append(np.full(k, row["step"]))
            for key, name in (("rollout", "logp_rollout"), ("before", "logp_before"), ("after", "logp_after"),
                              ("adv", "advantage"), ("token", "token_ids")):
                v = row.get(name)
                cols[key].append(np.array(v, np.float64)[m] if v is not None else np.full(k, np.nan))
            if row.get("token_ids") is not None:
                seqs[(str(path), i)] = np.where(m, row["token_ids"], -1)
    return {k: np.concatenate(v) for k, v in cols.items()}, seqs


def _mismatch(lr, bucket_tokens, unscored):
    out = {"tokens": int(bucket_tokens), "unscored_tokens": int(unscored)}
    n = lr.size
    if n:
        dev = np.expm1(lr)
        out |= {"mean_log_ratio": lr.mean(), "std_err": lr.std() / math.sqrt(n) if n > 1 else math.inf,
                "mean_abs_log_ratio": np.abs(lr).mean(), "k3_kl": (np.exp(lr) - 1 - lr).mean(),
                "mean_ratio": 1 + dev.mean(), "mean_ratio_std_err": dev.std() / math.sqrt(n) if n > 1 else math.inf}
    return out


def _slope(x, y):
    if x.size <= 2 or ((x - x.mean()) ** 2).sum() <= 0:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    b = (xc * yc).sum() / (xc * xc).sum()
    return {"slope": b, "std_err": math.sqrt(((yc - b * xc) ** 2).sum() / (x.size - 2) / (xc * xc).sum())}


def _sanity(total):
    mm = total["mismatch"]["all"]
    if "mean_log_ratio" not in mm:
        return {"has_rollout_logprobs": False, "offset_flagged": False, "flags": ["no rollout log-probs"]}
    flags = []
    mass, se = mm["mean_ratio"] - 1, mm["mean_ratio_std_err"]
    if mass < -RATIO_MASS_TOL and -mass > SIGMAS * se:
        flags.append("top-p or top-k")
    fit = total["log_ratio_slope"]
    if fit is not None and abs(fit["slope"]) > SLOPE_TOL and abs(fit["slope"]) > SIGMAS * fit["std_err"]:
        flags.append("temperature mismatch")
    return {"has_rollout_logprobs": True, "offset_flagged": bool(flags), "flags": flags, "mean_ratio": mm["mean_ratio"],
            "mean_ratio_std_err": se, "log_ratio_slope": fit, "ratio_mass_tol": RATIO_MASS_TOL,
            "slope_tol": SLOPE_TOL, "sigmas": SIGMAS}


def reference(paths, methods=None, params=(), policy: str = "auto") -> dict:
    """The whole report.json of `drpo inspect PATHS [--method ...] [--param ...] [--policy ...]`."""
    vs = variants(methods, params)
    t, seqs = read_tokens(paths)
    has_rollout = not np.isnan(t["rollout"]).all()
    use_after = policy in ("auto", "after") and not np.isnan(t["after"]).all()
    logp = t["after"] if use_after else t["before"]
    unscored = np.isnan(t["rollout"]) if has_rollout else np.zeros(t["before"].shape, bool)
    anchor = np.where(unscored, t["before"], t["rollout"]) if has_rollout else t["before"]
    mu = np.exp(anchor)
    bucket = np.select([mu <= EDGES[0], mu <= EDGES[1], mu <= EDGES[2]], [0, 1, 2], 3)
    adv = t["adv"]
    lr_all = np.clip(t["before"] - anchor, -20, 20)
    r = np.exp(np.clip(logp - anchor, -20, 20))
    w_b = {v["label"]: weight_and_boundary(v["method"], v["params"], logp, anchor, adv) for v in vs}

    def summary(sel):
        parts = (("all", sel), *((b, sel & (bucket == k)) for k, b in enumerate(BUCKETS)))
        n = int(sel.sum())
        out = {"tokens": n, "responses": len(set(zip(t["file"][sel], t["row"][sel]))),
               "long_tail_share": float((sel & (bucket == 0)).sum() / n),
               "bucket_share": {b: float((sel & (bucket == k)).sum() / n) for k, b in enumerate(BUCKETS)},
               "mismatch": {}, "methods": {}}
        for name, bsel in parts:
            scored = bsel & ~unscored if has_rollout else np.zeros_like(bsel)
            out["mismatch"][name] = _mismatch(lr_all[scored], bsel.sum(), (bsel & unscored).sum())
        scored = sel & ~unscored if has_rollout else np.zeros_like(sel)
        out["log_ratio_slope"] = _slope(anchor[scored], lr_all[scored])
        for v in vs:
            w, beyond = w_b[v["label"]]
            per = {}
            for name, bsel in parts:
                pos, neg, car = bsel & (adv > 0), bsel & (adv < 0), bsel & (adv != 0)
                frac = lambda a, b: float(a.sum() / b.sum()) if b.sum() else 0.0  # noqa: E731
                den = np.abs(adv * r)[bsel].sum()
                per[name] = {
                    "tokens": int(bsel.sum()), "tokens_pos": int(pos.sum()), "tokens_neg": int(neg.sum()),
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

    total = summary(np.ones(adv.shape, bool))
    return {
        "files": [{"path": str(p), "metadata": json.loads(pq.read_schema(p).metadata[b"drpo.dump"])} for p in paths],
        "policy": ["after" if use_after else "before"],
        "anchor": ["rollout" if has_rollout else "before"],
        "variants": [{"label": v["label"], "method": v["method"], "params": v["params"]} for v in vs],
        "buckets": list(BUCKETS),
        "total": total,
        "steps": {str(int(s)): summary(t["step"] == s) for s in np.unique(t["step"])},
        "sanity": _sanity(total),
        "disagreements": disagreements(t, seqs, vs, w_b, mu, logp, adv) if len(vs) > 1 else [],
    }


def disagreements(t, seqs, vs, w_b, mu, logp, adv) -> dict:
    """Every token's record, keyed by (file, row, position), and the TOP largest spreads of w."""
    w = np.stack([w_b[v["label"]][0] for v in vs])
    spread = w.max(0) - w.min(0)
    records = {}
    for i in range(spread.size):
        key = (t["file"][i], int(t["row"][i]), int(t["pos"][i]))
        ids = seqs.get(key[:2])
        p = key[2]
        near = [j for j in range(max(0, p - CONTEXT), min(len(ids), p + CONTEXT + 1)) if ids[j] >= 0] if ids is not None else None
        records[key] = {"file": key[0], "row": key[1], "step": int(t["step"][i]), "position": p, "mu": mu[i],
                        "pi": math.exp(logp[i]), "advantage": adv[i],
                        "weights": {v["label"]: w[j, i] for j, v in enumerate(vs)}, "spread": spread[i],
                        "token_id": int(ids[p]) if ids is not None else None,
                        "context_ids": [int(ids[j]) for j in near] if ids is not None else None,
                        "context_index": near.index(p) if ids is not None else None}
    return {"records": records, "top_spreads": sorted(spread, reverse=True)[:TOP]}


def compare(report: dict, ref: dict, rel: float = 1e-9) -> int:
    """Asserts every value in the report equals the reference's (numbers at `rel`, the rest
    exactly): a key the reference lacks, or one the report lacks, fails. Returns how many
    numbers were compared."""
    n = 0

    def walk(got, want, where):
        nonlocal n
        if isinstance(want, float) and not math.isfinite(want):
            want = None  # report.json writes inf as null
        if isinstance(want, dict):
            assert isinstance(got, dict) and set(got) == set(want), (
                f"{where}: keys differ: report only {sorted(set(got) - set(want))}, "
                f"reference only {sorted(set(want) - set(got))}")
            for k in want:
                walk(got[k], want[k], f"{where}.{k}")
        elif isinstance(want, list):
            assert isinstance(got, list) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
            for i, (g, w) in enumerate(zip(got, want)):
                walk(g, w, f"{where}[{i}]")
        elif isinstance(want, (bool, str)) or want is None:
            assert got == want and type(got) is type(want), f"{where}: report {got!r} != reference {want!r}"
        else:
            n += 1
            assert isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) <= rel * max(
                1.0, abs(want)), f"{where}: report {got!r} != reference {want!r}"

    report, ref = dict(report), dict(ref)
    got_sanity, want_sanity = dict(report.pop("sanity")), dict(ref.pop("sanity"))
    got_flags, want_flags = got_sanity.pop("flags"), want_sanity.pop("flags")
    assert len(got_flags) == len(want_flags) and all(w in g for g, w in zip(got_flags, want_flags)), (got_flags,
                                                                                                       want_flags)
    walk(got_sanity, want_sanity, "sanity")
    got_top, want_top = report.pop("disagreements"), ref.pop("disagreements")
    if want_top:
        walk([d["spread"] for d in got_top], want_top["top_spreads"], "disagreements.spread")
        for i, d in enumerate(got_top):
            walk(d, want_top["records"][(d["file"], d["row"], d["position"])], f"disagreements[{i}]")
    else:
        assert got_top == []
    walk(report, ref, "report")
    return n


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("dump")
    p.add_argument("report")
    p.add_argument("--method", dest="methods", action="append")
    p.add_argument("--param", dest="params", action="append", default=[])
    p.add_argument("--policy", default="auto")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    paths = sorted(Path(args.dump).rglob("*.parquet")) if Path(args.dump).is_dir() else [Path(args.dump)]
    n = compare(report, reference(paths, args.methods, args.params, args.policy))
    print(f"{n} numbers of {args.report} equal the float64 reference recomputed from {len(paths)} dump file(s)")


if __name__ == "__main__":
    main(sys.argv[1:])
