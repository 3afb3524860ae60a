"""Plugin loading: bundled plugins and the `ftplan` entry-point group, loaded once, explicitly.

Nothing loads at import time. `registry()` loads plugins on first use and caches the result;
a plugin that fails to import, implements an unknown hook, raises inside a hook, registers a
duplicate name or returns garbage is recorded as broken under its name, and the rest keep
working. `FTPLAN_PLUGINS=a,b` loads only the plugins named (bundled ones included: `hf`);
`FTPLAN_PLUGINS=` (empty) loads none - the way out of a broken install.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ftplan import __version__
from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.run import hookspecs

ENTRY_POINT_GROUP = "ftplan"
ENV_PLUGINS = "FTPLAN_PLUGINS"
# name -> module; bundled plugins register through the same hooks as third parties
BUNDLED = {"hf": "ftplan.backends.hf", "sagemaker": "ftplan.backends.sagemaker"}
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass
class PluginInfo:
    """One plugin as loaded (or not)."""

    name: str
    version: str | None
    source: str  # "bundled" or "entry point (distribution)"
    backends: list[str] = field(default_factory=list)
    catalog_entries: int = 0
    errors: list[str] = field(default_factory=list)


class Registry:
    """The plugin manager, what each plugin contributed, and what went wrong, by plugin name."""

    def __init__(self) -> None:
        import pluggy

        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._backends: dict[str, Any] | None = None

    # -- registration -------------------------------------------------------------------------
    def register(self, obj: object, name: str, *, version: str | None = None, source: str = "in process") -> bool:
        """Register a plugin object; False (and recorded as broken) if pluggy rejects it."""
        import pluggy

        info = self.plugins.setdefault(name, PluginInfo(name=name, version=version, source=source))
        try:
            self.pm.register(obj, name=name)
            self.pm.check_pending()  # a hookimpl whose name is not a ftplan hook
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            info.errors.append(f"rejected: {exc}")
            return False
        self._backends = None
        return True

    def unregister(self, name: str) -> None:
        """Remove a plugin (tests register a fake one and take it away again)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.plugins.pop(name, None)
        self._backends = None

    # -- what plugins contribute --------------------------------------------------------------
    def _info(self, plugin: str) -> PluginInfo:
        return self.plugins.setdefault(plugin, PluginInfo(name=plugin, version=None, source="in process"))

    def _error(self, plugin: str, message: str) -> None:
        self._info(plugin).errors.append(message)

    def _call_each(self, hook_name: str, arguments) -> None:
        """Call every implementation of a hook on its own, in registration order (the first to claim a
        name keeps it), with `arguments(owner)`; one raising is recorded and the rest still run."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            owner = impl.plugin_name
            self._info(owner)
            try:
                impl.function(**arguments(owner))
            except Exception as exc:  # a plugin's bug must not take ftplan down
                self._error(owner, f"{hook_name} raised {type(exc).__name__}: {exc}")

    def backends(self) -> dict[str, Any]:
        """Registered trainer backends by name (collected once per set of plugins)."""
        if self._backends is not None:
            return self._backends
        from ftplan.run.backend import TrainerBackend

        found: dict[str, Any] = {}

        def register_for(owner: str):
            def register(backend: Any) -> None:
                name = getattr(backend, "name", None)
                if not isinstance(backend, TrainerBackend):
                    self._error(owner, f"registered {type(backend).__name__!s}, not a TrainerBackend instance")
                elif not isinstance(name, str) or not NAME.match(name):
                    self._error(owner, f"backend name {name!r} is not a lower-case identifier")
                elif name in found:
                    self._error(owner, f"backend '{name}' is already registered by another plugin; ignored")
                else:
                    found[name] = backend
                    self.plugins[owner].backends.append(name)
            return register

        self._call_each("register_backends", lambda owner: {"register": register_for(owner)})
        self._backends = found
        return found

    def catalog_entries(self) -> None:
        """Add the plugins' models, GPUs and instance types to the catalog (bundled names win)."""
        kinds = {"model": catalog.CatalogModel, "gpu": catalog.Gpu, "instance": catalog.Instance}

        def collector(owner: str, kind: str):
            def register(entry: Any) -> None:
                try:
                    value = kinds[kind].model_validate(entry if isinstance(entry, dict) else entry.model_dump())
                    catalog.add_entry(kind, value)
                    self.plugins[owner].catalog_entries += 1
                except Exception as exc:
                    self._error(owner, f"catalog {kind} rejected: {str(exc).splitlines()[0]}")
            return register

        self._call_each("register_catalog_entries", lambda owner: {
            f"register_{kind}": collector(owner, kind) for kind in kinds})

    def broken(self) -> dict[str, list[str]]:
        return {name: info.errors for name, info in self.plugins.items() if info.errors}


def allowed_plugins() -> set[str] | None:
    """The names FTPLAN_PLUGINS allows; None when it is unset (everything loads)."""
    raw = os.environ.get(ENV_PLUGINS)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _entry_points():
    from importlib.metadata import entry_points

    return entry_points(group=ENTRY_POINT_GROUP)


@cache
def registry() -> Registry:
    """Load the bundled plugins and the entry-point plugins once; catalog entries are merged in."""
    reg = Registry()
    allowed = allowed_plugins()
    for name, module in BUNDLED.items():
        if allowed is None or name in allowed:
            _load_into(reg, name, lambda module=module: importlib.import_module(module), __version__, "bundled")
    for ep in _entry_points():
        if (allowed is None or ep.name in allowed) and ep.name not in reg.plugins:
            dist = getattr(ep, "dist", None)
            version = getattr(dist, "version", None)
            source = f"entry point ({dist.name})" if dist is not None else "entry point"
            _load_into(reg, ep.name, ep.load, version, source)
    reg.catalog_entries()
    return reg


def _load_into(reg: Registry, name: str, load, version: str | None, source: str) -> None:
    try:
        obj = load()
    except (Exception, SystemExit) as exc:  # ImportError, SyntaxError, a sys.exit() at import...
        reg.plugins[name] = PluginInfo(name=name, version=version, source=source,
                                       errors=[f"failed to import: {type(exc).__name__}: {exc}"])
        return
    reg.register(obj, name, version=version, source=source)


def reset() -> None:
    """Forget loaded plugins and plugin catalog entries (tests, and after FTPLAN_PLUGINS changes)."""
    registry.cache_clear()
    catalog.clear_added_entries()


def get_backend(name: str):
    """The backend registered as `name`; PlannerError listing the available ones otherwise."""
    reg = registry()
    backends = reg.backends()
    if name in backends:
        return backends[name]
    broken = [p for p, errors in reg.broken().items() if errors]
    hint = f" Broken plugins: {', '.join(broken)} (see ftplan plugins)." if broken else ""
    available = ", ".join(sorted(backends)) or "none"
    raise PlannerError(f"no trainer backend named '{name}' (available: {available}).{hint} "
                       "List them with: ftplan plugins")
