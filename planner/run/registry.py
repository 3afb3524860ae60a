"""Plugin loading: every plugin - the bundled backends included - comes from the `ftplan` entry-point
group, loaded once, explicitly, never at import time.

`registry()` loads plugins on first use and caches the result. A plugin that fails to import,
implements an unknown hook, raises inside a hook (SystemExit and KeyboardInterrupt included),
registers a duplicate name or returns garbage is recorded as broken under its name, and the rest
keep working. `FTPLAN_PLUGINS=a,b` loads only the plugins named (bundled ones included: `hf`);
`FTPLAN_PLUGINS=` (empty) loads none - the way out of a broken install. `FTPLAN_TRACE_HOOKS=1`
traces every hook call on stderr (pluggy's tracing).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable

import pluggy

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.names import NAME_PATTERN
from ftplan.run import hookspecs
from ftplan.run.backend import ANY_PLATFORM, TrainerBackend

ENTRY_POINT_GROUP = "ftplan"
DISTRIBUTION = "ftplan"  # entry points of this distribution are the bundled plugins
ENV_PLUGINS = "FTPLAN_PLUGINS"
ENV_TRACE = "FTPLAN_TRACE_HOOKS"
NAME = re.compile(NAME_PATTERN)


@dataclass
class PluginInfo:
    """One plugin as loaded (or not)."""

    name: str
    version: str | None
    source: str  # "bundled", "entry point (distribution)" or "in process"
    backends: list[str] = field(default_factory=list)
    catalog_entries: int = 0
    errors: list[str] = field(default_factory=list)


class Registry:
    """The plugin manager, what each plugin contributed, and what went wrong, by plugin name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get(ENV_TRACE):
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()
        self.plugins: dict[str, PluginInfo] = {}
        self.filtered_out: list[str] = []  # installed plugins FTPLAN_PLUGINS left out
        self._backends: dict[str, TrainerBackend] | None = None

    # -- registration -------------------------------------------------------------------------
    def register(self, obj: object, name: str, *, version: str | None = None, source: str = "in process") -> bool:
        """Register a plugin object; False (and recorded as broken) if pluggy rejects it."""
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

    # -- calling hooks ------------------------------------------------------------------------
    def _info(self, plugin: str) -> PluginInfo:
        return self.plugins.setdefault(plugin, PluginInfo(name=plugin, version=None, source="in process"))

    def call_each(self, hook_name: str, arguments: Callable[[str], dict[str, Any]]) -> None:
        """Call `hook_name` through pluggy once per plugin, with `arguments(plugin_name)`: implementations
        marked tryfirst, then the others in registration order (bundled plugins first, then entry points by
        name), then those marked trylast - so a name claimed earlier is kept. pluggy passes each
        implementation only the arguments it declares and traces the call; a plugin raising anything is
        recorded against it and the others still run."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        ordered = [i for i in impls if i.tryfirst] + [i for i in impls if not (i.tryfirst or i.trylast)] + \
            [i for i in impls if i.trylast]
        for impl in ordered:
            owner = impl.plugin_name
            self._info(owner)
            others = [other.plugin for other in impls if other.plugin_name != owner]
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(**arguments(owner))
            except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a plugin must not take ftplan down
                self._info(owner).errors.append(f"{hook_name} raised {type(exc).__name__}: {exc}")

    # -- what plugins contribute --------------------------------------------------------------
    def backends(self) -> dict[str, TrainerBackend]:
        """Registered trainer backends by name (collected once per set of plugins)."""
        if self._backends is not None:
            return self._backends
        found: dict[str, TrainerBackend] = {}

        def register_for(owner: str):
            def register(backend: Any) -> None:
                problem = _backend_problem(backend, found)
                if problem:
                    self._info(owner).errors.append(problem)
                else:
                    found[backend.name] = backend
                    self._info(owner).backends.append(backend.name)
            return register

        self.call_each("register_backends", lambda owner: {"register": register_for(owner)})
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
                    self._info(owner).catalog_entries += 1
                except Exception as exc:
                    self._info(owner).errors.append(f"catalog {kind} rejected: {_first_line(exc)}")
            return register

        self.call_each("register_catalog_entries", lambda owner: {
            f"register_{kind}": collector(owner, kind) for kind in kinds})

    def broken(self) -> dict[str, list[str]]:
        return {name: info.errors for name, info in self.plugins.items() if info.errors}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    if hasattr(exc, "errors"):  # pydantic: name the field
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        text = f"{where}: {first.get('msg', text)}" if where else first.get("msg", text)
    return text.splitlines()[0] if text else type(exc).__name__


def _backend_problem(backend: Any, found: dict[str, TrainerBackend]) -> str:
    """Why `backend` cannot be registered, or '' when it can."""
    name = getattr(backend, "name", None)
    if not isinstance(backend, TrainerBackend):
        return f"registered {type(backend).__name__!s}, not a TrainerBackend instance"
    if not isinstance(name, str) or not NAME.match(name):
        return f"backend name {name!r} is not a lower-case identifier"
    if name in found:
        return f"backend '{name}' is already registered by another plugin; ignored"
    return backend.declaration_problem()


def allowed_plugins() -> set[str] | None:
    """The names FTPLAN_PLUGINS allows; None when it is unset (everything loads)."""
    raw = os.environ.get(ENV_PLUGINS)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _entry_points() -> list:
    """The `ftplan` group, bundled entry points first (they keep their names), then by name."""
    from importlib.metadata import entry_points

    def bundled(ep) -> bool:
        return _dist_name(ep) == DISTRIBUTION

    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (not bundled(ep), ep.name))


def _dist_name(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"].lower() if dist is not None and dist.metadata["Name"] else None


@cache
def registry() -> Registry:
    """Load every plugin of the entry-point group once; catalog entries are merged in."""
    reg = Registry()
    allowed = allowed_plugins()
    for ep in _entry_points():
        dist = _dist_name(ep)
        bundled = dist == DISTRIBUTION
        if allowed is not None and ep.name not in allowed:
            reg.filtered_out.append(ep.name)
            continue
        if ep.name in reg.plugins:  # two distributions claim one plugin name: the first keeps it
            owner = reg.plugins[ep.name].source
            reg.plugins[f"{ep.name} ({dist})"] = PluginInfo(
                name=f"{ep.name} ({dist})", version=getattr(ep.dist, "version", None), source=f"entry point ({dist})",
                errors=[f"entry point name '{ep.name}' is already taken ({owner}); ignored - rename it in the "
                        f"[project.entry-points.ftplan] table of {dist}"])
            continue
        version = getattr(getattr(ep, "dist", None), "version", None)
        _load_into(reg, ep.name, ep.load, version, "bundled" if bundled else f"entry point ({dist})")
    for name in sorted((allowed or set()) - set(reg.plugins)):
        reg.plugins[name] = PluginInfo(name=name, version=None, source="FTPLAN_PLUGINS", errors=[
            f"not installed: {ENV_PLUGINS} names '{name}' but no plugin of that name is in the "
            f"'{ENTRY_POINT_GROUP}' entry-point group (see pip list, or fix {ENV_PLUGINS})"])
    reg.catalog_entries()
    return reg


def _load_into(reg: Registry, name: str, load, version: str | None, source: str) -> None:
    try:
        obj = load()
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # ImportError, SyntaxError, sys.exit() at import...
        reg.plugins[name] = PluginInfo(name=name, version=version, source=source,
                                       errors=[f"failed to import: {type(exc).__name__}: {exc}"])
        return
    reg.register(obj, name, version=version, source=source)


def reset() -> None:
    """Forget loaded plugins and plugin catalog entries (tests, and after FTPLAN_PLUGINS changes)."""
    registry.cache_clear()
    catalog.clear_added_entries()


def describe() -> list[dict[str, Any]]:
    """Every plugin as `ftplan plugins --json` prints it: name, version, source, catalog entries, errors, and
    its backends with methods, platforms and options (key, type, default, required, description)."""
    reg = registry()
    backends = reg.backends()
    return [{"name": p.name, "version": p.version, "source": p.source, "catalog_entries": p.catalog_entries,
             "backends": [{"name": b, "description": backends[b].description, "methods": list(backends[b].methods),
                           "platforms": list(backends[b].platforms), "options": backends[b].option_fields()}
                          for b in p.backends],
             "errors": p.errors} for p in reg.plugins.values()]


def backend_for(name: str | None, platform: str | None, methods: list[str]) -> tuple[TrainerBackend, str, list[str], str]:
    """The backend a plan will name, the platform and methods its search covers, and why that backend.

    `--backend NAME` bounds the search to what NAME supports. Otherwise the platform decides: sagemaker's own
    backend, skypilot for EC2 when it is installed (hf, which trains where `ftplan run` is typed, when not),
    or the backend a plugin registered for its platform.
    """
    if name is not None:
        backend, why = get_backend(name), "requested"
        if platform is not None and platform not in backend.platforms and ANY_PLATFORM not in backend.platforms:
            raise PlannerError(f"backend '{name}' runs on {', '.join(backend.platforms)}, not {platform}; drop "
                               "--platform or choose another --backend (see ftplan plugins)")
        platform = platform or next((p for p in backend.platforms if p != ANY_PLATFORM), "ec2")
    else:
        platform = platform or "ec2"
        available = registry().backends()
        runs = sorted((b for b in available.values() if platform in b.platforms), key=lambda b: b.name)
        if platform == "ec2":
            backend, why = (available["skypilot"], "skypilot") if "skypilot" in available else \
                (get_backend("hf"), "hf_without_skypilot")
        elif platform in available and platform in available[platform].platforms:
            backend, why = available[platform], "platform"
        elif runs:
            backend, why = runs[0], "plugin_platform"
        else:
            raise PlannerError(f"no trainer backend runs on platform '{platform}' (see ftplan plugins); install the "
                               "plugin that provides one, or choose --platform ec2")
    kept = [m for m in methods if m in backend.methods]
    if not kept:
        raise PlannerError(f"backend '{backend.name}' trains {', '.join(backend.methods)}, none of --methods "
                           f"{','.join(methods)}; choose methods it supports or another --backend")
    return backend, platform, kept, why


def get_backend(name: str) -> TrainerBackend:
    """The backend registered as `name`; PlannerError saying why it is not there otherwise."""
    reg = registry()
    backends = reg.backends()
    if name in backends:
        return backends[name]
    if name in reg.filtered_out:
        raise PlannerError(f"backend '{name}' is installed but {ENV_PLUGINS}={os.environ.get(ENV_PLUGINS, '')!r} "
                           f"leaves its plugin out; add '{name}' to {ENV_PLUGINS} or unset it")
    broken = sorted(p for p, errors in reg.broken().items() if errors)
    hint = f" Broken plugins: {', '.join(broken)} (see ftplan plugins)." if broken else ""
    available = ", ".join(sorted(backends)) or "none"
    raise PlannerError(f"no trainer backend named '{name}' (available: {available}).{hint} "
                       "List them with: ftplan plugins")
