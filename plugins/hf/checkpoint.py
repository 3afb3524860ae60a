"""Checkpoints that are never read half-written, and hold no pickle.

A checkpoint is a directory `checkpoint-NNNNNN` written first as `.checkpoint-NNNNNN.tmp` and
renamed when complete. Tensors (trainable weights, optimizer states, RNG states) are safetensors;
everything else is JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT = re.compile(r"^checkpoint-(\d{6})$")
KEEP = 2  # complete checkpoints kept; older ones are removed after a new one lands


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())


def _split_state(state: dict[str, Any], prefix: str, tensors: dict, rest: dict) -> None:
    """Tensors of a nested optimizer/scaler state go to `tensors` (flat keys), the rest to `rest`."""
    import torch

    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().contiguous().cpu()
        elif isinstance(value, dict):
            sub: dict = {}
            rest[str(key)] = sub
            _split_state(value, f"{name}/", tensors, sub)
        else:
            rest[str(key)] = value


def _join_state(rest: dict[str, Any], prefix: str, tensors: dict, device) -> dict:
    out: dict[Any, Any] = {}
    for key, value in rest.items():
        real_key = int(key) if key.isdigit() else key
        if isinstance(value, dict):
            out[real_key] = _join_state(value, f"{prefix}{key}/", tensors, device)
        else:
            out[real_key] = value
    for name, tensor in tensors.items():
        if name.startswith(prefix) and "/" not in name[len(prefix):]:
            key = name[len(prefix):]
            out[int(key) if key.isdigit() else key] = tensor.to(device)
    return out


def trainable_state(model) -> dict:
    """Trainable tensors by name (adapters for LoRA; every parameter for full fine-tuning)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save(output_dir: Path, step: int, *, model, full: bool, optimizer, scheduler, scaler, state: dict) -> Path:
    """Write checkpoint `step` atomically and prune old ones; returns its directory."""
    import torch
    from safetensors.torch import save_file, save_model

    final = output_dir / f"checkpoint-{step:06d}"
    tmp = output_dir / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if full:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    else:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    tensors: dict = {}
    rest: dict = {}
    _split_state(optimizer.state_dict(), "optimizer/", tensors, rest.setdefault("optimizer", {}))
    if scaler is not None:
        _split_state(scaler.state_dict(), "scaler/", tensors, rest.setdefault("scaler", {}))
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    save_file(tensors, str(tmp / "states.safetensors"))
    (tmp / "states.json").write_text(json.dumps(rest))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}))  # written last
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(output_dir)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never count)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory holds (from its name)."""
    return int(CHECKPOINT.match(path.name).group(1))


def remove_partial(output_dir: Path) -> None:
    """Drop temporary checkpoint directories a crash left behind."""
    for p in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def load(path: Path, *, model, full: bool, optimizer, scheduler, scaler, device) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG from `path`; returns the trainer state."""
    import torch
    from safetensors.torch import load_file, load_model

    if full:
        load_model(model, str(path / "model.safetensors"), device=str(device))
    else:
        saved = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in saved if n not in params]
        if missing:
            raise ValueError(f"checkpoint {path} has tensors this model lacks: {missing[:3]}")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device))
    tensors = load_file(str(path / "states.safetensors"))
    rest = json.loads((path / "states.json").read_text())
    optimizer.load_state_dict(_join_state(rest["optimizer"], "optimizer/", tensors, device))
    if scaler is not None and "scaler" in rest:
        scaler.load_state_dict(_join_state(rest["scaler"], "scaler/", tensors, "cpu"))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    torch.set_rng_state(tensors["rng/cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return json.loads((path / "trainer_state.json").read_text())
