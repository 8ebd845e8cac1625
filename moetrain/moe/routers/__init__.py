"""Routing methods, one file each, found by name: `router.method` (set by each `configs/router/<name>.yaml` preset
through its schema) picks the class registered under that name.

Adding a method: a module here with a `RouterConfig` subclass (its keys, `method` defaulting to the name) and a
`Router` subclass decorated with `@register(name)`; a preset `configs/router/<name>.yaml` whose defaults list starts
with `schema_<name>`; docs and tests. Nothing else changes: every module of this package is imported below, and
`register_configs` stores each method's config class for Hydra.
"""

from __future__ import annotations

import importlib
import pkgutil

from moetrain.config.schema import RouterConfig
from moetrain.moe.routers.base import ROUTERS, RouteContext, Router, RouterOutput, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ROUTERS", "RouteContext", "Router", "RouterOutput", "register", "router_class", "build_router"]


def router_class(cfg: RouterConfig) -> type[Router]:
    """The router class of `cfg.method`; a one-line ValueError names the known methods otherwise."""
    cls = ROUTERS.get(cfg.method)
    if cls is None:
        raise ValueError(f"router.method={cfg.method} is unknown; choose one of {', '.join(sorted(ROUTERS))} "
                         f"(select a method with its preset, e.g. router={next(iter(sorted(ROUTERS)))})")
    return cls


def build_router(dim: int, num_experts: int, cfg: RouterConfig) -> Router:
    return router_class(cfg)(dim, num_experts, cfg)
