"""Checkpoints that are never read half-written or damaged, and hold no pickle.

A checkpoint is a directory `checkpoint-NNNNNN`, written first as `.checkpoint-NNNNNN.tmp` and renamed
when complete. Tensors (trainable weights, optimizer states, each process's RNG state) are safetensors;
everything else is JSON; `manifest.json`, written last, lists every file with its size and sha256, so a
truncated or edited file is detected and the next older intact checkpoint is used instead.

Under DDP every process holds the same weights and optimizer states, so process 0 writes them; under
FSDP they are gathered into a full state dict first (every process takes part) and broadcast back on
load; under DeepSpeed ZeRO (any stage) the fp32 masters and optimizer states are gathered by parameter name
(zero.py) and each process takes its partition back on load. Every process writes its own RNG state, so a
resumed multi-process run draws what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import zero

CHECKPOINT = re.compile(r"^checkpoint-(\d{6})$")
KEEP = 2  # complete checkpoints kept; older ones are removed after a new one lands
MANIFEST = "manifest.json"
FULL_STATE = "full_state_dict"  # optimizer state keyed by parameter names (FSDP), not by position
ZERO_STATE = "zero_full"  # fp32 masters and optimizer states gathered from DeepSpeed ZeRO's partitions, by name


@dataclass
class Processes:
    """Which process this is, and how to wait for the others (a no-op for one process)."""

    rank: int = 0
    count: int = 1
    barrier: Callable[[], None] = lambda: None
    # every process's object, in rank order, on every process (torch.distributed.all_gather_object)
    gather: Callable[[Any], list] = lambda obj: [obj]

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_sharded(model) -> bool:
    """Parameters sharded over processes (FSDP): saving needs a gathered full state dict."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or type(model).__name__ == \
        "FullyShardedDataParallel"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _join_state(rest: dict[str, Any], prefix: str, tensors: dict, device, int_keys: bool = True) -> dict:
    out: dict[Any, Any] = {}
    for key, value in rest.items():
        real_key = int(key) if int_keys and key.isdigit() else key
        if isinstance(value, dict):
            out[real_key] = _join_state(value, f"{prefix}{key}/", tensors, device, int_keys)
        else:
            out[real_key] = value
    for name, tensor in tensors.items():
        if name.startswith(prefix) and "/" not in name[len(prefix):]:
            key = name[len(prefix):]
            out[int(key) if int_keys and key.isdigit() else key] = tensor.to(device)
    return out


def trainable_state(model) -> dict:
    """Trainable tensors by name (adapters for LoRA; every parameter for full fine-tuning)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _gathered(model, optimizer) -> tuple[dict, dict]:
    """FSDP: the full model and optimizer state dicts on process 0 (every process must call this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save(output_dir: Path, step: int, *, model, full: bool, optimizer, scheduler, scaler, state: dict,
         procs: Processes = Processes()) -> Path:
    """Write checkpoint `step` atomically and prune old ones; every process calls it."""
    import torch
    from safetensors.torch import save_file

    final = output_dir / f"checkpoint-{step:06d}"
    tmp = output_dir / f".checkpoint-{step:06d}.tmp"
    if zero.is_zero(model):
        fmt, gathered = ZERO_STATE, zero.gathered(model, optimizer, procs.main)
    elif procs.count > 1 and is_sharded(model):
        fmt, gathered = FULL_STATE, _gathered(model, optimizer)
    else:
        fmt, gathered = "positional", None
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    # every process's RNG state travels to process 0, which writes the whole checkpoint: the processes of a
    # multi-node run need not share a disk (a node restores the checkpoint from a bucket to resume)
    rngs = procs.gather(rng)
    if procs.main:
        clear(tmp)
        tmp.mkdir(parents=True)
        for rank, rng_state in enumerate(rngs):
            save_file(rng_state, str(tmp / f"rng-rank{rank}.safetensors"))
        _write_main(tmp, model, full, optimizer, scheduler, scaler, state, step, procs.count, gathered, fmt)
        clear(final)
        os.replace(tmp, final)
        for old in complete(output_dir)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    procs.barrier()
    return final


def _write_main(tmp: Path, model, full: bool, optimizer, scheduler, scaler, state: dict, step: int, processes: int,
                gathered: tuple[dict, dict] | None, fmt: str) -> None:
    """Process 0's part: weights, optimizer and scaler states, scheduler, trainer state, then the manifest."""
    from safetensors.torch import save_file, save_model

    if gathered is not None:
        model_state, optim_state = gathered
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        weights = {n: t.contiguous() for n, t in model_state.items() if full or n in trainable}
        save_file(weights, str(tmp / ("model.safetensors" if full else "trainable.safetensors")))
    elif full:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
        optim_state = optimizer.state_dict()
    else:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        optim_state = optimizer.state_dict()
    tensors: dict = {}
    rest: dict = {"format": fmt}
    _split_state(optim_state, "optimizer/", tensors, rest.setdefault("optimizer", {}))
    if scaler is not None:
        _split_state(scaler.state_dict(), "scaler/", tensors, rest.setdefault("scaler", {}))
    save_file(tensors, str(tmp / "states.safetensors"))
    (tmp / "states.json").write_text(json.dumps(rest))
    (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step, "processes": processes}))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    for p in tmp.iterdir():
        with open(p, "rb") as handle:
            os.fsync(handle.fileno())
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))  # written last
    with open(tmp / MANIFEST, "rb") as handle:
        os.fsync(handle.fileno())


def step_of(path: Path) -> int:
    """The optimizer step a checkpoint directory holds (from its name)."""
    return int(CHECKPOINT.match(path.name).group(1))


def damage(path: Path) -> str:
    """'' when the checkpoint is complete and every file matches its manifest entry, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("step") != step_of(path):
            return f"its manifest names step {manifest.get('step')!r}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    for name in ("trainer_state.json", "states.safetensors", "states.json", "scheduler.json"):
        if name not in files:
            return f"{name} is not listed"
    for name, entry in files.items():
        file = path / name
        if "/" in name or file.is_symlink() or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its manifest (truncated or changed)"
    step = read_state(path).get("step")
    if step != manifest["step"]:  # edited consistently with its manifest entry, yet not the step it claims
        return f"trainer_state.json names step {step!r}, its manifest {manifest['step']}"
    return ""


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json ({} when unreadable: damage() reports why)."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def complete(output_dir: Path) -> list[Path]:
    """Checkpoints whose directory was renamed into place (written whole), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.match(p.name) and (p / MANIFEST).exists()
             and not p.is_symlink()]
    return sorted(found, key=lambda p: p.name)


def newest_intact(output_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one that did not."""
    notes = []
    for path in reversed(complete(output_dir)):
        problem = damage(path)
        if not problem:
            return path, notes
        notes.append(f"{path.name} is damaged ({problem}); skipped")
    return None, notes


def clear(path: Path) -> None:
    """Remove `path` so a new file or directory can take its name: a symbolic link is unlinked itself, never
    followed (a planted `.checkpoint-*.tmp -> ../victim` must not send the checkpoint outside --output)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def remove_partial(output_dir: Path) -> None:
    """Drop temporary checkpoint directories a crash left behind (links by that name are unlinked, not
    followed)."""
    for p in output_dir.glob(".checkpoint-*.tmp"):
        clear(p)


def load(path: Path, *, model, full: bool, optimizer, scheduler, scaler, device,
         procs: Processes = Processes()) -> dict:
    """Restore weights, optimizer, scheduler, scaler and this process's RNG from `path`; returns the trainer
    state. Every process calls it."""
    import torch
    from safetensors.torch import load_file

    trainer_state = read_state(path)
    written_by = trainer_state.get("processes", 1)
    if written_by != procs.count:
        raise ValueError(f"{path.name} was written by {written_by} process(es); resume with the same number "
                         f"(--option processes={written_by})")
    rest = json.loads((path / "states.json").read_text())
    tensors = load_file(str(path / "states.safetensors"))
    weights_file = path / ("model.safetensors" if full else "trainable.safetensors")
    weights = load_file(str(weights_file))
    _check_weights(model, weights, full)
    fmt = rest.get("format")
    if (fmt == ZERO_STATE) != zero.is_zero(model):
        raise ValueError(f"it was written {'with' if fmt == ZERO_STATE else 'without'} DeepSpeed ZeRO, this run "
                         f"{'uses' if zero.is_zero(model) else 'does not use'} it")
    if fmt == ZERO_STATE:
        zero.load(model, optimizer, weights, _join_state(rest["optimizer"], "optimizer/", tensors, "cpu",
                                                         int_keys=False))
    elif fmt == FULL_STATE:
        _load_gathered(model, optimizer, weights, _join_state(rest["optimizer"], "optimizer/", tensors, "cpu",
                                                              int_keys=False), procs)
    else:
        if full:
            from safetensors.torch import load_model

            load_model(model, str(weights_file), device=str(device))  # handles tied weights
        else:
            _copy_weights(model, weights)
        optimizer.load_state_dict(_join_state(rest["optimizer"], "optimizer/", tensors, device))
    if scaler is not None and "scaler" in rest:
        scaler.load_state_dict(_join_state(rest["scaler"], "scaler/", tensors, "cpu"))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = load_file(str(path / f"rng-rank{procs.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return trainer_state


def _check_weights(model, saved: dict, full: bool) -> None:
    """Before anything is loaded: the saved tensors must be this model's (names and shapes) and finite."""
    import torch

    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    unexpected, missing = sorted(set(saved) - set(params)), sorted(trainable - set(saved))
    if unexpected or (missing and not full):
        raise ValueError(f"it does not match this model (missing {missing[:2]}, unexpected {unexpected[:2]})")
    for name, tensor in saved.items():
        shape = zero.full_shape(params[name])  # a DTensor (FSDP) reports its full shape; ZeRO-3 its ds_shape
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, the model {shape}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or infinite values")


def _copy_weights(model, saved: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor.to(params[name].device))


def _load_gathered(model, optimizer, weights: dict, optim_state: dict, procs: Processes) -> None:
    """FSDP: process 0's full state dicts, broadcast and sharded into every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    # one call each: set_state_dict would skip the model on the processes that pass it empty
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights if procs.main else {}, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state if procs.main else {}, options=options)
