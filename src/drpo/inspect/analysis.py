"""What each registered trust region would do to the dumped tokens, accumulated step by step
while the dump streams past (bounded memory: sums per step and bucket, a fixed-size token
sample per step for the figure, the top disagreements).

Per token: mu = exp(anchor log-prob) (the rollout log-prob where the dump has one, else the
train-side one before the update), pi = exp(policy log-prob) (`policy`: after / before the
update), A = advantage. Every method's weight and boundary come from the registry
(`drpo.objectives.METHODS`), the same functions the losses and their diagnostics use.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from drpo.dumps import DumpError, iter_tokens, read_metadata
from drpo.objectives import METHODS, get_method
from drpo.objectives.diagnostics import LONG_TAIL_MU, WEIGHT_CATEGORIES, grad_mass, token_mismatch, weight_categories
from drpo.textfile import split_assignment

# Behaviour-probability buckets: mu <= 0.01 (the long tail), 0.01-0.1, 0.1-0.5, > 0.5.
BUCKET_EDGES = (LONG_TAIL_MU, 0.1, 0.5)
BUCKETS = ("<=0.01", "0.01-0.1", "0.1-0.5", ">0.5")
ALL = "all"
# Sanity checks of the rollout log-probs against the trainer's (before the update), where the
# sampled tokens come from mu (so E_mu[pi/mu] = pi's mass on mu's support, 1 when they match):
#  - top-p / top-k applied by one side only: mean(r) - 1 < 0 (pi puts mass outside mu's support);
#  - a temperature mismatch: within a context log r = (T_engine/T_trainer - 1) * log mu + c, so
#    the pooled slope of log r on log mu is far from 0 (near that value).
# Flagged beyond these sizes and SIGMAS standard errors (noise alone gives neither).
RATIO_MASS_TOL = 0.01
SLOPE_TOL = 0.03
SIGMAS = 5.0
FIGURE_TOKENS = 4000  # tokens per step kept for the scatter figure
TOP_DISAGREEMENTS = 20
CONTEXT = 8  # tokens of context each side of a disagreement

# Per (variant, bucket) sums; the report divides them.
METHOD_SUMS = ("tokens", "pos", "neg", "out_pos", "out_neg", "carries", *WEIGHT_CATEGORIES, "kept_num", "kept_den")
# The report's name of each weight category's share (of the tokens with A != 0).
CATEGORIES = ("zeroed_frac", "attenuated_frac", "corrective_frac", "amplified_frac")
# Per bucket sums of the train/inference log-ratio (before - rollout) and the long tail.
BATCH_SUMS = ("tokens", "mm_tokens", "lr_sum", "lr_sq", "abs_lr", "k3", "unscored", "rdev", "rdev_sq")
REGRESSION_SUMS = ("n", "x", "y", "xx", "xy", "yy")  # log r against the rollout log-prob


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    params: Mapping[str, Any]


def parse_param(spec: str) -> tuple[str, str, list[float | bool]]:
    """'drpo.delta=0.05,0.15' -> ('drpo', 'delta', [0.05, 0.15])."""
    key, raw = split_assignment(spec, "--param expects METHOD.NAME=V1,V2,...",
                                ok=lambda key, raw: all(key.partition(".")[::2]) and bool(raw))  # METHOD, NAME, values
    method, _, name = key.partition(".")
    get_method(method)
    values: list[float | bool] = []
    for item in raw.split(","):
        item = item.strip()
        if item.lower() in ("true", "false"):
            values.append(item.lower() == "true")
        else:
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(f"--param {key}: {item!r} is not a number or true/false") from None
    return method, name, values


def make_variants(methods: Sequence[str] | None = None, params: Sequence[str] = ()) -> list[Variant]:
    """Every method (default: all registered) at its defaults, or at each combination of the
    swept values of its parameters. Bad names and values raise ValueError naming them."""
    names = list(methods) if methods else list(METHODS)
    for n in names:
        get_method(n)
    sweeps: dict[str, dict[str, list]] = {}
    for spec in params:
        method, name, values = parse_param(spec)
        if method not in names:
            names.append(method)
        sweeps.setdefault(method, {})[name] = values
    out = []
    for n in names:
        m = get_method(n)
        grid = sweeps.get(n, {})
        for combo in itertools.product(*grid.values()):  # one empty combination when nothing is swept
            given = dict(zip(grid, combo))
            resolved = m.resolve_params(given)
            label = n if not given else n + "(" + ", ".join(f"{k}={_fmt(v)}" for k, v in given.items()) + ")"
            out.append(Variant(label, n, resolved))
    return out


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}"


def bucket_of(mu: np.ndarray) -> np.ndarray:
    return np.digitize(mu, BUCKET_EDGES, right=True)  # mu <= 0.01 -> 0, ..., > 0.5 -> 3


@dataclass
class StepAcc:
    methods: np.ndarray  # [variants, buckets, METHOD_SUMS]
    batch: np.ndarray  # [buckets, BATCH_SUMS]
    regression: np.ndarray  # [REGRESSION_SUMS]
    responses: int = 0  # a response never spans two record batches, so per-batch counts add up
    sample_keys: np.ndarray | None = None  # random keys of the figure's kept tokens
    sample: np.ndarray | None = None  # [k, 3]: mu, D, sign(A)


def _new_step(n_variants: int) -> StepAcc:
    return StepAcc(np.zeros((n_variants, len(BUCKETS), len(METHOD_SUMS))), np.zeros((len(BUCKETS), len(BATCH_SUMS))),
                   np.zeros(len(REGRESSION_SUMS)))


def _bincount(idx: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(idx, weights=weights, minlength=len(BUCKETS))[: len(BUCKETS)]


def _check_method(path: str, meta: dict) -> None:
    """The method a dump was trained with is one the report can name and draw."""
    method = meta.get("method")
    if method is not None and method not in METHODS:
        raise DumpError(f"{path}: metadata 'method' = {method!r} is not a registered method (all rows, column "
                        f"metadata.method); registered: {', '.join(sorted(METHODS))}. Pass the module that "
                        "registers it: drpo inspect --import MODULE")


class Analysis:
    """Feed it dump files (`add_file`), then read `result()`."""

    def __init__(self, variants: Sequence[Variant], *, policy: str = "auto", seed: int = 0):
        if policy not in ("auto", "before", "after"):
            raise ValueError(f"policy must be auto, before or after, got {policy!r}")
        self.variants = list(variants)
        self.policy = policy
        self.steps: dict[int, StepAcc] = {}
        self.files: list[dict] = []
        self.rng = np.random.default_rng(seed)
        self.top: list = []  # min-heap of (disagreement, counter, record)
        self._counter = itertools.count()
        self.used_policy: set[str] = set()
        self.used_anchor: set[str] = set()

    def add_file(self, path: str, *, batch_rows: int = 512) -> None:
        meta = read_metadata(path)
        _check_method(str(path), meta)
        self.files.append({"path": str(path), "metadata": meta})
        for batch in iter_tokens(path, batch_rows=batch_rows, context=True):
            self._add(batch)

    def _add(self, b) -> None:
        if b.logp_after is not None and self.policy in ("auto", "after"):
            logp, pol = b.logp_after, "after"
        elif self.policy == "after":
            raise DumpError(f"{b.path}: --policy after but the dump has no logp_after column (column 'logp_after')")
        else:
            logp, pol = b.logp_before, "before"
        self.used_policy.add(pol)
        if b.logp_rollout is not None:
            unscored = np.isnan(b.logp_rollout)
            anchor = np.where(unscored, b.logp_before, b.logp_rollout)
            self.used_anchor.add("rollout")
        else:
            unscored, anchor = np.zeros(b.logp_before.shape, bool), b.logp_before
            self.used_anchor.add("before")
        for step in np.unique(b.step):
            sel = b.step == step
            acc = self.steps.get(int(step))
            if acc is None:
                acc = self.steps[int(step)] = _new_step(len(self.variants))
            acc.responses += int(np.unique(b.row[sel]).size)
            self._add_step(acc, b, sel, logp[sel], anchor[sel], unscored[sel], int(step))

    def _add_step(self, acc: StepAcc, b, sel, logp_np, anchor_np, unscored, step: int) -> None:
        mu_np = np.exp(anchor_np)
        bucket = bucket_of(mu_np)
        adv_np = b.advantage[sel]
        logp, anchor, adv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (logp_np, anchor_np, adv_np))
        r = token_mismatch(logp, anchor).ratio
        pos, neg, carries = adv > 0, adv < 0, adv != 0
        weights = []
        for v, variant in enumerate(self.variants):
            m = METHODS[variant.method]
            w = m.weight(logp, anchor, adv, **variant.params)
            out = m.boundary(logp, anchor, adv, **variant.params) if m.boundary is not None else torch.zeros_like(pos)
            category = weight_categories(w)
            cols = (torch.ones_like(adv), pos, neg, out & pos, out & neg, carries,
                    *(carries & category[c] for c in WEIGHT_CATEGORIES), *grad_mass(adv, r, w))
            for k, c in enumerate(cols):  # in METHOD_SUMS order
                acc.methods[v, :, k] += _bincount(bucket, c.to(torch.float64).numpy())
            weights.append(w)
        # Train/inference mismatch: the train-side log-prob before the update against the rollout's.
        sums = {"tokens": np.ones(bucket.size), "unscored": unscored.astype(float)}
        if b.logp_rollout is not None:
            scored = (~unscored).astype(float)
            before, rollout = (torch.from_numpy(np.where(unscored, 0.0, x)) for x in (b.logp_before[sel], anchor_np))
            lr, rt, k3 = (x.numpy() for x in token_mismatch(before, rollout))  # unscored tokens: log r = 0
            sums |= {"mm_tokens": scored, "lr_sum": lr * scored, "lr_sq": lr * lr * scored, "abs_lr": np.abs(lr) * scored,
                     "k3": k3 * scored, "rdev": (rt - 1) * scored, "rdev_sq": (rt - 1) ** 2 * scored}
            x, y = anchor_np[~unscored], lr[~unscored]
            acc.regression += [x.size, x.sum(), y.sum(), (x * x).sum(), (x * y).sum(), (y * y).sum()]
        for key, values in sums.items():
            acc.batch[:, BATCH_SUMS.index(key)] += _bincount(bucket, values)
        self._keep_sample(acc, mu_np, np.exp(logp_np) - mu_np, np.sign(adv_np))
        if len(weights) > 1:
            self._keep_disagreements(b, sel, torch.stack(weights), mu_np, logp_np, adv_np, step)

    def _keep_sample(self, acc: StepAcc, mu, d, sign) -> None:
        keys = self.rng.random(mu.size)
        pts = np.stack([mu, d, sign], axis=1)
        if acc.sample is not None:
            keys, pts = np.concatenate([acc.sample_keys, keys]), np.concatenate([acc.sample, pts])
        if keys.size > FIGURE_TOKENS:
            keep = np.argpartition(keys, FIGURE_TOKENS)[:FIGURE_TOKENS]
            keys, pts = keys[keep], pts[keep]
        acc.sample_keys, acc.sample = keys, pts

    def _keep_disagreements(self, b, sel, w: torch.Tensor, mu, logp, adv, step: int) -> None:
        spread = (w.max(0).values - w.min(0).values).numpy()
        k = min(TOP_DISAGREEMENTS, spread.size)
        idx = np.argpartition(-spread, k - 1)[:k]
        rows, pos = b.row[sel], b.pos[sel]
        for i in idx:
            item = (float(spread[i]), next(self._counter))
            if len(self.top) >= TOP_DISAGREEMENTS and item <= self.top[0][:2]:
                continue
            ids = b.seq_tokens[int(rows[i]) - b.row_offset] if b.seq_tokens is not None else None
            p = int(pos[i])
            # the context: up to CONTEXT response tokens each side
            near = [] if ids is None else [j for j in range(max(0, p - CONTEXT), min(len(ids), p + CONTEXT + 1))
                                           if ids[j] >= 0]
            record = {
                "file": b.path, "row": int(rows[i]), "step": step, "position": p,
                "mu": float(mu[i]), "pi": float(math.exp(logp[i])), "advantage": float(adv[i]),
                "weights": {v.label: float(w[j, i]) for j, v in enumerate(self.variants)},
                "spread": float(spread[i]),
                "token_id": int(ids[p]) if ids is not None else None,
                "context_ids": [int(ids[j]) for j in near] if ids is not None else None,
                "context_index": near.index(p) if ids is not None else None,
            }
            # full: the new record replaces the smallest kept one (it is larger, see above)
            (heapq.heappush if len(self.top) < TOP_DISAGREEMENTS else heapq.heapreplace)(self.top, (*item, record))

    # ------------------------------------------------------------------ results
    def result(self) -> dict:
        if not self.steps:
            raise DumpError("no response tokens in the dump(s): " + ", ".join(f["path"] for f in self.files))
        steps = {s: self._summarize(a.methods, a.batch, a.regression, a.responses) for s, a in sorted(self.steps.items())}
        tot = [sum(getattr(a, k) for a in self.steps.values()) for k in ("methods", "batch", "regression")]
        total = self._summarize(*tot, sum(a.responses for a in self.steps.values()))
        return {
            "files": self.files,
            "policy": sorted(self.used_policy),
            "anchor": sorted(self.used_anchor),
            "variants": [{"label": v.label, "method": v.method, "params": dict(v.params)} for v in self.variants],
            "buckets": list(BUCKETS),
            "total": total,
            "steps": {str(s): v for s, v in steps.items()},
            "sanity": sanity(total),
            "disagreements": [r for _, _, r in sorted(self.top, key=lambda e: (-e[0], e[1]))],
        }

    def samples(self) -> dict[int, np.ndarray]:
        return {s: a.sample for s, a in sorted(self.steps.items()) if a.sample is not None}

    def _summarize(self, methods: np.ndarray, batch: np.ndarray, regression: np.ndarray, responses: int) -> dict:
        def ratio_or(num, den, empty):
            return float(num / den) if den > 0 else empty

        def method_stats(s: np.ndarray) -> dict:
            d = dict(zip(METHOD_SUMS, s))
            return {
                "tokens": int(d["tokens"]),
                "tokens_pos": int(d["pos"]),
                "tokens_neg": int(d["neg"]),
                "beyond_boundary_pos_frac": ratio_or(d["out_pos"], d["pos"], 0.0),
                "beyond_boundary_neg_frac": ratio_or(d["out_neg"], d["neg"], 0.0),
                **{key: ratio_or(d[c], d["carries"], 0.0) for c, key in zip(WEIGHT_CATEGORIES, CATEGORIES)},
                "kept_grad_mass": ratio_or(d["kept_num"], d["kept_den"], 1.0),
            }

        def batch_stats(s: np.ndarray) -> dict:
            d = dict(zip(BATCH_SUMS, s))
            n = d["mm_tokens"]
            mean = ratio_or(d["lr_sum"], n, None)
            out = {"tokens": int(d["tokens"]), "unscored_tokens": int(d["unscored"])}
            if n > 0:
                var = max(d["lr_sq"] / n - mean * mean, 0.0)
                rmean = d["rdev"] / n
                rvar = max(d["rdev_sq"] / n - rmean * rmean, 0.0)
                out |= {"mean_log_ratio": mean, "std_err": math.sqrt(var / n) if n > 1 else math.inf,
                        "mean_abs_log_ratio": float(d["abs_lr"] / n), "k3_kl": float(d["k3"] / n),
                        "mean_ratio": float(1 + rmean), "mean_ratio_std_err": math.sqrt(rvar / n) if n > 1 else math.inf}
            return out

        per_method = {variant.label: {ALL: method_stats(methods[v].sum(0)),
                                      **{name: method_stats(methods[v, b]) for b, name in enumerate(BUCKETS)}}
                      for v, variant in enumerate(self.variants)}
        n_tok = batch[:, 0].sum()
        return {
            "tokens": int(n_tok),
            "responses": responses,
            "long_tail_share": ratio_or(batch[0, 0], n_tok, 0.0),
            "bucket_share": {name: ratio_or(batch[b, 0], n_tok, 0.0) for b, name in enumerate(BUCKETS)},
            "mismatch": {ALL: batch_stats(batch.sum(0)), **{name: batch_stats(batch[b]) for b, name in enumerate(BUCKETS)}},
            "log_ratio_slope": _slope(regression),
            "methods": per_method,
        }


def _slope(reg: np.ndarray) -> dict | None:
    """Least-squares slope of log r on the rollout log-prob, with its standard error."""
    n, x, y, xx, xy, yy = reg
    sxx, sxy, syy = xx - x * x / max(n, 1), xy - x * y / max(n, 1), yy - y * y / max(n, 1)
    if n <= 2 or sxx <= 0:
        return None
    b = sxy / sxx
    return {"slope": float(b), "std_err": float(math.sqrt(max(syy - b * sxy, 0.0) / (n - 2) / sxx))}


def sanity(total: dict) -> dict:
    """Flags a systematic train/inference log-ratio offset over all steps (see SLOPE_TOL)."""
    mm = total["mismatch"][ALL]
    if "mean_log_ratio" not in mm:
        return {"has_rollout_logprobs": False, "offset_flagged": False, "flags": [
            "the dump has no rollout log-probs: the anchor is the train-side log-prob before the update, so the "
            "train/inference mismatch cannot be measured"]}
    flags = []
    mass, se = mm["mean_ratio"] - 1, mm["mean_ratio_std_err"]
    if mass < -RATIO_MASS_TOL and -mass > SIGMAS * se:
        flags.append(f"mean pi_train/mu_rollout over the sampled tokens = {mm['mean_ratio']:.4f} (1 expected; "
                     f"{-mass / se:.0f} standard errors below): the trainer puts {-mass:.1%} of its probability "
                     "outside what the engine samples from: top-p or top-k applied by the engine only? Compute the "
                     "train-side log-probs with the same truncation, or use its log-probs as the anchor")
    fit = total["log_ratio_slope"]
    if fit is not None and abs(fit["slope"]) > SLOPE_TOL and abs(fit["slope"]) > SIGMAS * fit["std_err"]:
        flags.append(f"log(pi_train/mu_rollout) is linear in the rollout log-prob with slope {fit['slope']:+.3f} "
                     f"(+-{fit['std_err']:.3f}): a temperature mismatch (engine temperature / trainer temperature "
                     f"roughly {1 + fit['slope']:.2f}); divide the trainer's logits by the sampling temperature")
    return {"has_rollout_logprobs": True, "offset_flagged": bool(flags), "flags": flags,
            "mean_ratio": mm["mean_ratio"], "mean_ratio_std_err": se, "log_ratio_slope": fit,
            "ratio_mass_tol": RATIO_MASS_TOL, "slope_tol": SLOPE_TOL, "sigmas": SIGMAS}


def analyze(paths: Iterable[str], variants: Sequence[Variant], *, policy: str = "auto",
            batch_rows: int = 512) -> tuple[dict, Analysis]:
    a = Analysis(variants, policy=policy)
    for p in paths:
        a.add_file(str(p), batch_rows=batch_rows)
    return a.result(), a
