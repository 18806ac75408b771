"""A flat registry of policy objectives, keyed by name (like verl's policy-loss registry),
each entry pairing the objective with its closed-form gradient weight and boundary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

ParamValue = float | bool


@dataclass(frozen=True)
class Method:
    """One registered objective. See `drpo.objectives.methods` for the function contracts."""

    name: str
    objective: Callable
    weight: Callable
    boundary: Callable | None
    gradient: Callable | None
    params: Mapping[str, ParamValue]
    check_params: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, ParamValue]:
        """Defaults overlaid with `given`; unknown names and bad values raise ValueError."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "(none)"
            raise ValueError(
                f"method {self.name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"its parameters are: {known}"
            )
        resolved = dict(self.params)
        for key, value in given.items():
            default = self.params[key]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"method {self.name!r}: parameter {key!r} must be a bool, got {value!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"method {self.name!r}: parameter {key!r} must be a number, got {value!r}")
                value = float(value)
                off = value == math.inf and default == math.inf  # an inf default means "off"
                if not (math.isfinite(value) or off) or value <= 0:
                    raise ValueError(f"method {self.name!r}: parameter {key!r} must be > 0 and finite, got {value!r}")
            resolved[key] = value
        if self.check_params is not None:
            self.check_params(resolved)
        return resolved


_REGISTRY: dict[str, Method] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)


def register_method(
    name: str,
    *,
    params: Mapping[str, ParamValue],
    check_params: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
):
    """Class decorator registering a method. The decorated class (or any object) must have
    `objective`, `weight` and `boundary` attributes (boundary may be None), and may have a
    closed-form `gradient` (dJ/dlogp; default A * r * w):

        @register_method("my_method", params={"tau": 0.1})
        class MyMethod:
            @staticmethod
            def objective(logp, old_logp, adv, *, tau): return J, penalty
            @staticmethod
            def weight(logp, old_logp, adv, *, tau): return w
            boundary = None
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method name must be a non-empty string, got {name!r}")

    def decorate(spec):
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"method {name!r} is already registered (pass overwrite=True to replace it)")
        for attr in ("objective", "weight"):
            if not callable(getattr(spec, attr, None)):
                raise TypeError(f"method {name!r}: `{attr}` must be callable")
        boundary = getattr(spec, "boundary", None)
        gradient = getattr(spec, "gradient", None)
        for key, value in params.items():
            if not isinstance(value, (bool, int, float)):
                raise TypeError(f"method {name!r}: default of parameter {key!r} must be a number or bool")
        _REGISTRY[name] = Method(
            name=name,
            objective=spec.objective,
            weight=spec.weight,
            boundary=boundary,
            gradient=gradient,
            params=MappingProxyType({k: (v if isinstance(v, bool) else float(v)) for k, v in params.items()}),
            check_params=check_params,
        )
        return spec

    return decorate


def get_method(name: str | Method) -> Method:
    """The method registered as `name`; a Method is returned as is (bound once by a caller)."""
    if isinstance(name, Method):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}") from None


def list_methods() -> dict[str, dict[str, ParamValue]]:
    """Every registered method with its parameters and defaults."""
    return {name: dict(m.params) for name, m in _REGISTRY.items()}
