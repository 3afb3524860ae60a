"""The hooks a ftplan plugin can implement. Bundled plugins use exactly these, as third parties do.

A plugin is a module (or object) with functions decorated by `planner.hookspecs.hookimpl` whose
names match the specs below; it is found through the `ftplan` entry-point group:

    [project.entry-points.ftplan]
    my_backend = "my_package.ftplan_plugin"

Every hook receives a `register` callback and returns nothing; all implementations are called
(no first-result-wins), and each call is isolated: one plugin raising does not stop the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from ftplan.data.catalog import CatalogModel, Gpu, Instance
    from ftplan.run.backend import TrainerBackend

PROJECT = "ftplan"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[TrainerBackend], None]) -> None:
    """Register trainer backends: call `register(backend)` once per `planner.backend.TrainerBackend`
    instance. Backend names must be unique across plugins; a duplicate is reported against the
    plugin that registered it second, and that backend is ignored. Returns nothing."""


@hookspec
def register_catalog_entries(register_model: Callable[[CatalogModel], None],
                             register_gpu: Callable[[Gpu], None],
                             register_instance: Callable[[Instance], None]) -> None:
    """Add catalog entries - models, GPU types, instance types with their prices (e.g. GCP, Azure or
    on-premise hardware) - by calling the matching `register_*` with a `planner.catalog` model.
    An entry whose name already exists is reported and ignored: plugins extend the bundled
    catalog, they never silently replace its figures. Returns nothing."""
