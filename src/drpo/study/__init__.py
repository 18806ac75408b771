"""The comparison study: a grid of `drpo train` runs (methods x mismatch settings x seeds and
parameter sweeps), run resumably as separate processes (`drpo compare`) and summarized into
tables and figures (`drpo report`)."""

from drpo.study.grid import Grid, RunSpec, Variant, expand, load_grid, parse_grid
from drpo.study.presets import PRESETS, get_preset
from drpo.study.runner import Outcome, run_grid

__all__ = ["PRESETS", "Grid", "Outcome", "RunSpec", "Variant", "expand", "get_preset", "load_grid", "parse_grid",
           "run_grid"]
