"""Methods, registered by name. Importing this package imports every module beside it, and each registers its
method: adding a method is adding one file here (see docs/architecture.md)."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any

from neverfade.engine.contract import check_flags
from neverfade.methods.base import METHODS, Method, Param, ParameterError, register

SHARED = {"base", "spec"}  # modules here that hold no method
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")

BASELINE = "baseline"

__all__ = ["METHODS", "Method", "Param", "ParameterError", "register", "build_methods", "BASELINE"]


def build_methods(methods: Iterable[Method | str], params: dict[str, dict[str, Any]] | None = None) -> list[Method]:
    """Method objects from names or objects; `params` maps a method name to its parameter values.
    The name `baseline` means no method."""
    params = dict(params or {})
    built: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            built.append(m)
            continue
        if m == BASELINE:
            continue
        if m not in METHODS:
            raise ParameterError(f"unknown method {m!r}; known: {', '.join([BASELINE, *METHODS])}")
        built.append(METHODS[m](**params.pop(m, {})))
    names = [m.name for m in built]
    if len(set(names)) != len(names):
        raise ParameterError(f"a method is listed twice: {', '.join(names)}")
    check_flags(built)
    if params:
        raise ParameterError(f"parameters given for {', '.join(params)}, which is not among the methods used")
    return built
