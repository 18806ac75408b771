"""The comparison grid: settings x method variants x seeds, expanded into one `drpo train`
run each. A grid is plain data (a preset in `drpo.study.presets` or a YAML file with the same
fields; docs/study.md shows one), validated here so that a typo fails before an hour of runs
starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Mapping

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)

from drpo.objectives import get_method
from drpo.textfile import NotUTF8Error, read_utf8

# run ids become directory names: keep them portable and unambiguous
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# keys the grid itself owns: a setting or `base` must not set them behind its back
_GRID_KEYS = ("seed", "objective.method", "objective.params")

Scalar = str | int | float | bool | None
_UNION_MEMBERS = ("str", "int", "float", "bool", "none")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or "__" in name:
        raise ValueError(
            f"{kind} name {name!r} must be letters, digits, '.', '_', '+', '-' (no '__', no leading symbol)"
        )
    return name


def _check_overrides(where: str, overrides: Mapping[str, Any]) -> None:
    for key, value in overrides.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"{where}: override key {key!r} must be a dotted config path like 'optim.lr'")
        if key in _GRID_KEYS or key.startswith("objective.params."):
            raise ValueError(
                f"{where}: override key {key!r} is set by the grid itself (use `methods`/`sweeps`/`seeds`)"
            )
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"{where}: override {key!r} must be a scalar, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: override {key!r} must be finite, got {value!r}")


class Variant(BaseModel):
    """One objective configuration: a registered method with parameter overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, AfterValidator(partial(_check_name, "variant"))]
    method: str
    params: dict[str, float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "Variant":
        try:
            get_method(self.method).resolve_params(self.params)
        except ValueError as err:
            raise ValueError(f"variant {self.name!r}: {err}") from None
        return self


def _as_variants(v: Any) -> Any:
    # a bare method name means "that method with its registered defaults"
    return [{"name": e, "method": e} if isinstance(e, str) else e for e in v] if isinstance(v, list) else v


Variants = Annotated[list[Variant], BeforeValidator(_as_variants)]


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    settings: list[str]
    variants: Variants


class Grid(BaseModel):
    """A validated comparison grid."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, AfterValidator(partial(_check_name, "grid"))]
    description: str = ""
    config: str | None = None  # base `drpo train` config file (relative to the working directory)
    base: dict[str, Scalar] = Field(default_factory=dict)
    settings: dict[str, dict[str, Scalar]]
    setting_notes: dict[str, str] = Field(default_factory=dict)
    methods: Variants
    seeds: list[int]
    sweeps: list[Sweep] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "Grid":
        _check_overrides("base", self.base)
        if not self.settings:
            raise ValueError("settings: at least one setting is required")
        for name, ov in self.settings.items():
            _check_name("setting", name)
            _check_overrides(f"settings.{name}", ov)
        unknown_notes = sorted(set(self.setting_notes) - set(self.settings))
        if unknown_notes:
            raise ValueError(f"setting_notes: unknown setting(s) {unknown_notes}")
        if not self.methods:
            raise ValueError("methods: at least one method is required")
        if not self.seeds:
            raise ValueError("seeds: at least one seed is required")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicates in {self.seeds}")
        if any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds: must be >= 0, got {self.seeds}")
        for i, sweep in enumerate(self.sweeps):
            for s in sweep.settings:
                if s not in self.settings:
                    raise ValueError(f"sweeps[{i}].settings: unknown setting {s!r}; known: {sorted(self.settings)}")
        # the same variant name must always mean the same objective
        seen: dict[str, Variant] = {}
        for v in self.methods + [v for sw in self.sweeps for v in sw.variants]:
            if v.name in seen and seen[v.name] != v:
                raise ValueError(f"variant name {v.name!r} is defined twice with different method/params")
            seen[v.name] = v
        return self


@dataclass(frozen=True)
class RunSpec:
    """One `drpo train` run of the grid."""

    run_id: str
    setting: str
    variant: Variant
    seed: int
    overrides: dict[str, Scalar]  # every `--set key=value` passed to `drpo train`

    def as_record(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "setting": self.setting,
            "variant": self.variant.name,
            "method": self.variant.method,
            "params": dict(self.variant.params),
            "seed": self.seed,
            "overrides": dict(self.overrides),
        }


def expand(grid: Grid) -> list[RunSpec]:
    """All runs of the grid, settings-major, seed-minor; each (setting, variant, seed) once."""
    cells: list[tuple[str, Variant]] = [(s, v) for s in grid.settings for v in grid.methods]
    for sweep in grid.sweeps:
        for s in sweep.settings:
            cells += [(s, v) for v in sweep.variants]
    runs: list[RunSpec] = []
    seen: set[str] = set()
    for setting, variant in cells:
        for seed in grid.seeds:
            rid = f"{setting}__{variant.name}__s{seed}"
            if rid in seen:  # a sweep may repeat a main-grid variant: run it once
                continue
            seen.add(rid)
            overrides = {**grid.base, **grid.settings[setting], "seed": seed, "objective.method": variant.method,
                         "objective.params": "{}",  # the variant's parameters only, not the config file's
                         **{f"objective.params.{k}": v for k, v in variant.params.items()}}
            runs.append(RunSpec(rid, setting, variant, seed, overrides))
    return runs


def variant_entries(data: Mapping) -> list[dict]:
    """The variants of grid data (a dumped Grid, a grid.yaml): the main methods, then each sweep's."""
    return [*data.get("methods", []), *(v for sw in data.get("sweeps", []) for v in sw.get("variants", []))]


def parse_grid(data: Any, source: str = "grid") -> Grid:
    """Validate grid data; errors name the source and the offending field."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a grid must be a mapping, got {type(data).__name__}")
    try:
        return Grid.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: invalid grid"]
        for e in err.errors():
            loc = list(e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if loc and loc[-1] in _UNION_MEMBERS:  # pydantic reports each scalar type it tried
                loc, msg = loc[:-1], "must be a scalar (string, number, bool or null)"
            line = f"  {'.'.join(str(p) for p in loc) or '(top level)'}: {msg} (got {e.get('input')!r})"
            if line not in lines:
                lines.append(line)
        raise ValueError("\n".join(lines)) from None


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    try:
        data = yaml.safe_load(read_utf8(path))
    except NotUTF8Error as err:
        raise ValueError(f"grid file {err}") from None
    except OSError as err:
        raise ValueError(f"grid file {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"grid file {str(path)!r}: not valid YAML: {err}") from None
    return parse_grid(data, source=str(path))


def format_value(value: Scalar) -> str:
    """A `--set` value that YAML parses back to the same scalar."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    return str(value)
