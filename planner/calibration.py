"""Measured utilisation that replaces the catalogued default for a GPU, model and method.

`ftplan measure --device cuda` and a finished `ftplan run` record what they measured here; the
time estimates of `recommend` use it and say so.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from .errors import PlannerError
from .files import atomic_write_text, user_dir


class Calibration(BaseModel):
    """One measured utilisation of the FLOPs ftplan counts (recomputation included)."""

    gpu: str
    model: str
    method: str
    utilization: float = Field(gt=0, le=1)
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    source: str = Field(description="what measured it: 'ftplan measure' or 'ftplan run <dir>'")
    date: str


class CalibrationFile(BaseModel):
    schema_version: int = 1
    entries: list[Calibration] = []


def calibration_path() -> Path:
    return user_dir() / "calibration.json"


def load(path: Path | None = None) -> CalibrationFile:
    """The calibration file, or an empty one when there is none."""
    path = path or calibration_path()
    if not path.exists():
        return CalibrationFile()
    try:
        return CalibrationFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        raise PlannerError(f"calibration file {path} is unreadable ({type(exc).__name__}); "
                           "delete it or fix it, estimates then use the catalogued defaults") from None


def lookup(gpu: str, model: str, method: str, path: Path | None = None) -> Calibration | None:
    """The latest calibration for exactly this GPU, model and method."""
    matches = [c for c in load(path).entries
               if (c.gpu.lower(), c.model.lower(), c.method) == (gpu.lower(), model.lower(), method)]
    return matches[-1] if matches else None


def record(entry: Calibration, path: Path | None = None) -> Path:
    """Add `entry` (replacing one for the same GPU, model and method); written atomically."""
    path = path or calibration_path()
    current = load(path)
    key = (entry.gpu.lower(), entry.model.lower(), entry.method)
    kept = [c for c in current.entries if (c.gpu.lower(), c.model.lower(), c.method) != key]
    atomic_write_text(path, CalibrationFile(entries=[*kept, entry]).model_dump_json(indent=1))
    return path


def today() -> str:
    return date.today().isoformat()
