"""What a checkpoint was trained on - the data's bytes, the plan's training fields, the method - recorded in its
trainer state, so `--resume` with other data, another plan or another method is refused with the difference
named instead of silently continuing a different run."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ftplan.api import Plan, RunRequest

_DIGESTS: dict[tuple, dict] = {}  # (path, size, mtime) -> digest: prepare and the run hash a file once


def _files(path: Path) -> list[Path]:
    if path.is_dir():  # a saved datasets directory: every file in it, in a stable order
        return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
    return [path]


def data_digest(path: Path) -> dict[str, Any]:
    """{name, bytes, sha256} of a data file (or a datasets directory's files), read in blocks."""
    files = _files(path)
    key = (str(path.resolve()), *((f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _DIGESTS:
        digest, size = hashlib.sha256(), 0
        for f in files:
            digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            with open(f, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
                    size += len(block)
        _DIGESTS[key] = {"name": path.name, "bytes": size, "sha256": digest.hexdigest()}
    return _DIGESTS[key]


def plan_fields(plan: Plan) -> dict[str, Any]:
    """The plan's fields that decide what a step computes: the model's architecture, the method and its setup,
    targets, batch, schedule and seed, and the GPUs the batch is spread over."""
    t = plan.training
    return {"model.config_sha256": plan.model.config_sha256, "training.method": t.method,
            "training.setup": t.setup.model_dump(mode="json"), "training.targets": t.targets,
            "training.global_batch": t.global_batch, "training.grad_accum": t.grad_accum, "training.epochs": t.epochs,
            "training.learning_rate": t.learning_rate, "training.lr_scheduler": t.lr_scheduler,
            "training.warmup_ratio": t.warmup_ratio, "training.max_grad_norm": t.max_grad_norm,
            "training.seed": t.seed, "training.packing": t.packing,
            "hardware.gpus": plan.hardware.instance_count * plan.hardware.gpus_per_instance}


def of(plan: Plan, request: RunRequest) -> dict[str, Any]:
    """This run's fingerprint."""
    return {"method": plan.training.method, "plan": plan_fields(plan), "data": data_digest(request.data)}


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def difference(saved: dict[str, Any] | None, current: dict[str, Any]) -> str:
    """'' when a checkpoint's fingerprint matches this run's, else the first difference, named."""
    if not isinstance(saved, dict):
        return ""  # written before fingerprints existed: nothing to compare
    if saved.get("method") != current["method"]:
        return f"trained {saved.get('method')}, this plan trains {current['method']}"
    old, new = saved.get("plan") or {}, current["plan"]
    for key in new:
        if key in old and old[key] != new[key]:
            return f"was trained with {key} = {_short(old[key])}, this plan has {_short(new[key])}"
    data, now = saved.get("data") or {}, current["data"]
    if data and data.get("sha256") != now["sha256"]:
        return (f"was trained on other data ({data.get('name')}, {data.get('bytes')} bytes, sha256 "
                f"{str(data.get('sha256'))[:12]}...; --data is {now['name']}, {now['bytes']} bytes, sha256 "
                f"{now['sha256'][:12]}...)")
    return ""
