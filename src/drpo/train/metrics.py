"""Per-step metrics: the contract (every key a run logs, declared once with its reduction),
one JSON object per line in metrics.jsonl, the same scalars in TensorBoard, and a PNG of the
curves at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from drpo.files import append_line, atomic_write, jsonable, save_figure

# ---------------------------------------------------------------- the contract

Reduction = Literal["mean", "sum", "min", "max"]

# Every key of a metrics.jsonl row but "step", with how its values combine: the micro-batches
# (or optimizer steps) of one RL step into the step's value, and the steps of a run into its
# summary. A "mean" is the unweighted mean of those values (a micro-batch's value is itself a
# mean over its tokens). Docs: docs/trainer.md.
METRICS: dict[str, Reduction] = {
    # greedy evaluation on the held-out split (step 0: the warm start; then every eval_every)
    "eval/accuracy": "mean",
    "eval/response_length": "mean",
    # the step's rollout batch
    "reward/mean": "mean",
    "reward/std": "mean",
    "reward/accuracy": "mean",
    "advantage/zero_groups_frac": "mean",
    "response/length": "mean",
    "response/finished_frac": "mean",
    "response/long_tail_frac": "mean",
    "tokens/generated": "sum",
    "staleness": "max",
    # the objective's diagnostics (drpo.objectives.METRIC_NAMES) over the step's micro-batches
    "objective/tokens": "sum",
    "objective/ratio_mean": "mean",
    "objective/ratio_min": "min",
    "objective/ratio_max": "max",
    "objective/abs_log_ratio": "mean",
    "objective/k3_kl": "mean",
    "objective/tv_mean": "mean",
    "objective/tv_max": "max",
    "objective/beyond_boundary_pos_frac": "mean",
    "objective/beyond_boundary_neg_frac": "mean",
    "objective/weight_mean": "mean",
    "objective/weight_min": "min",
    "objective/weight_max": "max",
    "objective/weight_zero_frac": "mean",
    "objective/weight_attenuated_frac": "mean",
    "objective/weight_corrective_frac": "mean",
    "objective/weight_amplified_frac": "mean",
    "objective/surrogate": "mean",
    "objective/regularizer": "mean",
    "objective/long_tail_frac": "mean",
    "objective/kept_grad_mass": "mean",
    "objective/nonfinite_tokens": "sum",
    "objective/loss": "mean",
    # rollout-vs-train mismatch on the first mini-batch, before any optimizer step
    "mismatch/abs_log_ratio": "mean",
    "mismatch/k3_kl": "mean",
    "mismatch/max_abs_log_ratio": "max",
    "mismatch/max_ratio_dev": "max",
    # the optimizer steps
    "grad_norm": "mean",
    "grad_norm_max": "max",
    "lr": "mean",
    # wall-clock seconds
    "time/rollout": "sum",
    "time/reward": "sum",
    "time/update": "sum",
    "time/eval": "sum",
}

_REDUCE = {"mean": lambda v: sum(v) / len(v), "sum": sum, "min": min, "max": max}


def combine(key: str, values: list[float]) -> float:
    """`values` of the declared metric `key` (micro-batches, or steps) reduced as declared."""
    if key not in METRICS:
        raise KeyError(f"metric {key!r} is not declared in drpo.train.metrics.METRICS")
    return _REDUCE[METRICS[key]](values)


def declared(*keys: str) -> tuple[str, ...]:
    """`keys`, each checked to be a declared metric (a reader's keys fail loudly at import if
    the trainer renames one, instead of silently finding no rows)."""
    missing = [k for k in keys if k not in METRICS]
    if missing:
        raise KeyError(f"metric(s) {missing} are not declared in drpo.train.metrics.METRICS")
    return keys


# Wall-clock dependent keys: everything else in metrics.jsonl is a function of config + seed.
TIMING_KEYS = tuple(k for k in METRICS if k.startswith("time/"))

# Curves in the end-of-run PNG, in panel order.
PLOT_KEYS = ("reward/mean", "eval/accuracy", "mismatch/abs_log_ratio", "objective/kept_grad_mass",
             "objective/weight_mean", "response/length", "grad_norm", "objective/loss")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, keep rows up to `last_step` (the checkpoint's step): rows logged after the
    checkpoint are recomputed, so keeping them would duplicate steps. A torn last line
    (killed mid-write) is dropped for the same reason. The kept rows replace the file
    atomically: a kill or a full disk here leaves the old file whole."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # only the final line can be torn; everything after it is post-checkpoint anyway
        if row.get("step", math.inf) <= last_step:
            kept.append(line)
    atomic_write(path, "".join(k + "\n" for k in kept), "truncate")


class MetricsLogger:
    """Appends rows to metrics.jsonl (each line fsynced before the step's checkpoint can be
    written, and never left torn) and to TensorBoard. `purge_step`: the first step this
    process logs on resume; TensorBoard then hides the events an earlier process wrote from
    that step on, so resumed steps are not shown twice."""

    def __init__(self, out_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        append_line(self._fd, json.dumps(jsonable(row, nonfinite=str)), self.path, "metrics")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()  # on disk with the jsonl line, so a resume neither loses nor repeats a step

    def close(self) -> None:
        os.close(self._fd)
        if self._tb is not None:
            self._tb.close()


def plot_curves(rows: list[dict[str, Any]], png_path: Path, title: str = "") -> Path:
    """One panel per key in PLOT_KEYS that the rows contain."""
    from matplotlib.figure import Figure

    keys = [k for k in PLOT_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    if not keys:
        raise ValueError("no plottable metrics in the rows")
    cols = 4
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4 * cols, 3 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, png_path, "curves", dpi=90)
    return Path(png_path)
