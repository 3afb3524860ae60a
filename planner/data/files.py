"""Writing files so that a crash mid-write leaves the old file (or none) intact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ftplan.errors import PlannerError


def user_dir() -> Path:
    """Where ftplan keeps user-level state (calibration, price caches): $FTPLAN_HOME or ~/.config/ftplan."""
    home = os.environ.get("FTPLAN_HOME")
    if home:
        return Path(home)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "ftplan"


Model = TypeVar("Model", bound=BaseModel)


def read_user_file(path: Path, model: type[Model], what: str, fix: str) -> Model:
    """A user-level JSON file (calibration, price cache) as `model`; an empty one when it is missing,
    PlannerError naming the file and the fix when it is unreadable."""
    if not path.exists():
        return model()
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except ValidationError as exc:  # valid JSON, refused values (a price of Infinity): name the field
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise PlannerError(f"{what} {path} is refused ({where}: {first.get('msg', 'invalid')}); {fix}") from None
    except (OSError, ValueError):
        raise PlannerError(f"{what} {path} is unreadable; {fix}") from None


def check_writable(directory: Path, label: str) -> None:
    """PlannerError unless `directory` exists or could be created, and files can be written there.

    Probes with a temporary directory, removed at once (os.access says yes to root even on
    read-only file systems); nothing is left behind.
    """
    base = directory.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise PlannerError(f"{label}: {base} is a file, so {directory} cannot be a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ftplan-probe-", dir=base))
    except OSError as exc:
        raise PlannerError(f"{label}: cannot write in {base} ({exc.strerror}); choose a writable location") from None


def atomic_write_text(path: Path, text: str, *, overwrite: bool = True) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`.

    With `overwrite=False` an existing `path` is an error and nothing is written.
    """
    if path.is_dir():
        raise PlannerError(f"{path} is a directory; give a file name")
    if not overwrite and path.exists():
        raise PlannerError(f"{path} already exists; choose another path with -o or pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise PlannerError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():  # appeared while we wrote
            raise PlannerError(f"{path} already exists; choose another path with -o or pass --force to replace it")
        os.replace(tmp, path)
    except OSError as exc:
        raise PlannerError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
