"""ftplan's own source as it imports, for remote backends that run ftplan where it is not installed.

The repository keeps planner/, plugins/ and catalogs/ as folders, while what runs is the one
import package `ftplan` (ftplan.backends, ftplan.catalogs beneath it). A remote job gets that
import layout, plus a `.dist-info` with the entry points, so the bundled backends are found the
way every plugin is - through the `ftplan` entry-point group - when the folder is on sys.path.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path

from ftplan import __version__

DISTRIBUTION = "ftplan"
PACKAGES = {"ftplan": "ftplan", "ftplan.backends": "ftplan/backends", "ftplan.catalogs": "ftplan/catalogs"}


def _skip(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")


def source_files() -> list[tuple[Path, str]]:
    """(file on disk, path in the import layout) for every file of the ftplan package."""
    files: dict[str, Path] = {}
    for module, arcname in PACKAGES.items():
        root = Path(importlib.import_module(module).__file__).resolve().parent
        for path in sorted(root.rglob("*")):
            if path.is_file() and not _skip(path.relative_to(root)):
                files.setdefault(f"{arcname}/{path.relative_to(root).as_posix()}", path)
    return sorted(((path, name) for name, path in files.items()), key=lambda item: item[1])


def entry_points_text() -> str:
    """The `ftplan` entry-point group of this installation (the bundled backends), as entry_points.txt."""
    try:
        eps = [ep for ep in metadata.distribution(DISTRIBUTION).entry_points if ep.group == "ftplan"]
    except metadata.PackageNotFoundError:  # running from a bundle itself: the dist-info beside it
        eps = [ep for ep in metadata.entry_points(group="ftplan") if ep.value.startswith("ftplan.")]
    lines = sorted(f"{ep.name} = {ep.value}" for ep in eps)
    return "[ftplan]\n" + "".join(line + "\n" for line in lines)


def dist_info_files() -> dict[str, str]:
    """A minimal `.dist-info` that makes importlib.metadata find ftplan's entry points in the bundle."""
    folder = f"{DISTRIBUTION}-{__version__}.dist-info"
    return {f"{folder}/METADATA": f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {__version__}\n",
            f"{folder}/entry_points.txt": entry_points_text()}
