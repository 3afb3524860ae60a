"""The hooks a ftplan plugin can implement. Bundled plugins use exactly these, as third parties do.

A plugin is a module (or object) with functions decorated by `ftplan.api.hookimpl` whose names
match the specs below; it is found through the `ftplan` entry-point group:

    [project.entry-points.ftplan]
    my_backend = "my_package.ftplan_plugin"

Hooks are called through pluggy, so an implementation may take only the arguments it uses
(`def register_catalog_entries(register_gpu): ...`). Each plugin's implementation is called on
its own, in registration order - bundled plugins first, then entry points by name - with those
marked `tryfirst` before and `trylast` after; a name taken by an earlier call is kept. One that
raises (even SystemExit or KeyboardInterrupt) is reported against that plugin and the others
still run. Every hook receives
`register` callbacks and returns nothing (the return value is ignored). `FTPLAN_TRACE_HOOKS=1`
prints every hook call with its arguments on stderr.
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
    """Register trainer backends.

    :param register: call it once per `ftplan.api.TrainerBackend` instance. A backend's `name` must be
        a lower-case identifier, unique across plugins: a name already taken is reported against the
        plugin that registered it second, and that backend is ignored.
    :returns: nothing.
    """


@hookspec
def register_catalog_entries(register_model: Callable[[CatalogModel], None],
                             register_gpu: Callable[[Gpu], None],
                             register_instance: Callable[[Instance], None]) -> None:
    """Add catalog entries: models, GPU types, and instance types with their prices (GCP, Azure,
    on-premise hardware...).

    :param register_model: call with an `ftplan.api.CatalogModel` (or a dict of its fields).
    :param register_gpu: call with an `ftplan.api.Gpu`; register a GPU before instances that name it.
    :param register_instance: call with an `ftplan.api.Instance`, priced in its own region and platform.
    Entries are validated (positive prices, memory and throughput); a name that already exists is
    reported and ignored: plugins extend the bundled catalog, they never replace its figures.
    :returns: nothing.
    """
