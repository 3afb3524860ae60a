"""Measured utilisation that replaces the catalogued default for a GPU, model and method.

`ftplan measure --device cuda` and a finished `ftplan run` record what they measured here; the
time estimates of `recommend` use it and say so.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from pydantic import BaseModel, Field

from ftplan.data.files import atomic_write_text, read_user_file, user_dir


class Calibration(BaseModel):
    """One measured utilisation of the FLOPs ftplan counts (recomputation included), and the utilisation
    ceiling of the time model that reproduces it."""

    gpu: str
    model: str
    method: str
    utilization: float = Field(gt=0, le=1, description="measured: counted FLOPs x tokens/s / dense peak")
    u_max: float | None = Field(None, gt=0, le=1, description="the time model's ceiling that gives the measured "
                                                              "step time (absent in files from ftplan 0.1)")
    tokens_per_micro_batch: float | None = Field(None, gt=0, description="tokens of one micro-batch on one GPU "
                                                                         "when it was measured")
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    source: str = Field(description="what measured it: 'ftplan measure' or 'ftplan run <dir>'")
    date: str
    elementwise_bytes_per_hidden: float = Field(0.0, ge=0, description="the time model's elementwise constant "
                                                                       "when u_max was solved (0: before the term, "
                                                                       "2026-12-01)")
    eager_bytes_per_score: float = Field(0.0, ge=0, description="the time model's eager-attention constant when "
                                                                "u_max was solved (0: before the term, 2026-12-01)")
    attention_kernel_ratio: float = Field(1.0, gt=0, le=1, description="the time model's attention kernel ratio to "
                                                                       "the matmuls when u_max was solved (1: "
                                                                       "before the term, 2026-12-02)")
    attention: str | None = Field(None, description="the attention implementation it was measured with (absent "
                                                    "before 2026-12-01: eager attention's cost then went unrestated)")

    def ceiling(self) -> float:
        """The utilisation ceiling to plan with (an entry from ftplan 0.1 has only the measured utilisation)."""
        return self.u_max or self.utilization


class CalibrationFile(BaseModel):
    schema_version: int = 1
    entries: list[Calibration] = []

    def find(self, gpu: str, model: str, method: str) -> Calibration | None:
        """The latest calibration for exactly this GPU, model and method."""
        key = (gpu.lower(), model.lower(), method)
        matches = [c for c in self.entries if (c.gpu.lower(), c.model.lower(), c.method) == key]
        return matches[-1] if matches else None


def calibration_path() -> Path:
    return user_dir() / "calibration.json"


def load(path: Path | None = None) -> CalibrationFile:
    """The calibration file, or an empty one when there is none."""
    return read_user_file(path or calibration_path(), CalibrationFile, "calibration file",
                          "delete it or fix it, estimates then use the catalogued defaults")


def lookup(gpu: str, model: str, method: str, path: Path | None = None) -> Calibration | None:
    """The latest calibration for exactly this GPU, model and method."""
    return load(path).find(gpu, model, method)


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


def gpu_for_device(device_name: str, memory_bytes: int):
    """The catalogued GPU a CUDA device name ('NVIDIA A100-SXM4-80GB', 'NVIDIA H200') stands for, or None."""
    from ftplan.data import catalog

    exact = catalog.find_gpu(device_name)  # most device names are catalogued aliases ('NVIDIA GeForce RTX 4090')
    if exact is not None:
        return exact
    name, compact = device_name.upper(), catalog.gpu_key(device_name)
    # a family's form-factor variants (A100-PCIe-40GB next to A100-40GB) match only when the device says so
    variant = ("pcie", "nvl")
    matches = [g for g in catalog.gpus().values() if g.name.split("-")[0].upper() in name
               and not any(v in catalog.gpu_key(g.name) and v not in compact for v in variant)]
    if not matches:
        return None
    # A100-40GB vs A100-80GB, V100-16GB vs -32GB: the closest memory size decides.
    return min(matches, key=lambda g: abs(g.memory_bytes - memory_bytes))


def utilization_from(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Measured utilisation of the counted FLOPs: achieved FLOP/s over the dense peak."""
    return flops_per_token * tokens_per_second / peak_flops
