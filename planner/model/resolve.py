"""Turn the MODEL argument into a ModelSpec: catalog name or HF id, local config.json, or the Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.model.spec import ModelSpec, spec_from_config


def from_catalog(entry: catalog.CatalogModel, variant: catalog.ModelVariant | None = None) -> ModelSpec:
    """The spec of a catalogued model, or of one of its instruct/chat variants (its name and Hub id, the
    entry's architecture)."""
    if variant is not None:
        return spec_from_config(entry.config, name=variant.name, source=f"catalog (architecture of {entry.name})",
                                hf_id=variant.hf_id, license=entry.license)
    return spec_from_config(entry.config, name=entry.name, source="catalog", hf_id=entry.hf_id,
                            license=entry.license)


def read_config_file(path: Path) -> dict:
    """Read a config.json (or the one inside a directory); PlannerError saying what is wrong."""
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlannerError(f"{path.parent}: the directory has no config.json; pass the model directory "
                               "that holds it, or the file itself")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such file; pass a path to a config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlannerError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc}); "
                           "check the path and its permissions") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           "fix the file or download it again") from None
    if not isinstance(config, dict):
        raise PlannerError(f"{path}: config.json must hold a JSON object, got {type(config).__name__}")
    return config


def _looks_like_path(arg: str) -> bool:
    """A .json file, an explicit path, or org/name where 'org' is a local directory (a typo'd path,
    not a Hub id to try over the network)."""
    return arg.endswith(".json") or arg.startswith((".", "/", "~")) or Path(arg).parent.is_dir() and "/" in arg


def _name_for(path: Path) -> str:
    """'my-model' for my-model/config.json or for the directory my-model; the stem for other files."""
    if path.is_file() and path.stem != "config":
        return path.stem
    return (path if path.is_dir() else path.parent).resolve().name or str(path)


def _looks_like_hub_id(arg: str) -> bool:
    parts = arg.split("/")
    return len(parts) == 2 and all(parts) and " " not in arg


def fetch_hub_config(repo_id: str, *, revision: str | None = None) -> dict:
    """Download (or read from the local cache) only config.json of a Hub repository."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a base dependency
        raise PlannerError("fetching configs needs huggingface_hub: pip install huggingface_hub") from None
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except GatedRepoError:
        raise PlannerError(f"{repo_id} is gated on the Hugging Face Hub: accept its licence on the model page "
                           "and log in (hf auth login), or pass a local config.json") from None
    except RepositoryNotFoundError:
        raise PlannerError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in); "
                           f"{_catalog_hint(repo_id)}") from None
    except LocalEntryNotFoundError:  # subclasses EntryNotFoundError, so it must come first
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise PlannerError(f"{repo_id} is not in the catalog, {reason} and no cached config.json exists; "
                           "connect to the network or pass a local config.json") from None
    except EntryNotFoundError:
        raise PlannerError(f"{repo_id} has no config.json on the Hub; pass a local config.json") from None
    except OSError as exc:
        raise PlannerError(f"{repo_id}: could not fetch config.json ({exc}); pass a local config.json") from None
    return read_config_file(Path(path))


def _catalog_hint(arg: str) -> str:
    hint = catalog.model_suggestions(arg)
    return (hint.strip() + " " if hint else "") + "See the catalog with: ftplan models"


def resolve_model(arg: str) -> ModelSpec:
    """The ModelSpec for a catalog name, a catalogued HF id, a config.json path or directory, or a Hub id."""
    arg = arg.strip()
    if not arg:
        raise PlannerError("no model given; pass a catalog name (ftplan models), a config.json path or a HF id")
    found = catalog.find_variant(arg)
    if found is not None:
        return from_catalog(*found)
    path = Path(arg).expanduser()
    if path.exists() or _looks_like_path(arg):
        config = read_config_file(path)
        spec = spec_from_config(config, name=_name_for(path), source=f"config.json at {path}",
                                hf_id=config.get("_name_or_path") or None)
        spec.local_dir = str((path if path.is_dir() else path.parent).resolve())
        return spec
    if _looks_like_hub_id(arg):
        return spec_from_config(fetch_hub_config(arg), name=arg, source="Hugging Face Hub config.json", hf_id=arg)
    raise PlannerError(f"unknown model '{arg}'.{catalog.model_suggestions(arg)} Pass a catalog name "
                       "(ftplan models), a path to a config.json, or a Hugging Face id such as org/name")
