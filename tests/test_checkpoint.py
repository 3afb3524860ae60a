"""The hf backend's checkpoints: verified by their manifest, never loaded damaged, and correct under FSDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ftplan.backends.hf import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # a frozen base weight, as LoRA has
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save(out: Path, step: int, model, optimizer, scheduler) -> Path:
    return checkpoint.save(out, step, model=model, full=False, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           state={"tokens": step})


def load(path: Path, model, optimizer, scheduler) -> dict:
    return checkpoint.load(path, model=model, full=False, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           device="cpu")


def test_a_checkpoint_round_trips_and_lists_every_file_in_its_manifest(tmp_path):
    model, optimizer, scheduler = tiny()
    path = save(tmp_path, 3, model, optimizer, scheduler)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    assert checkpoint.damage(path) == "" and checkpoint.step_of(path) == 3
    other, other_opt, other_sched = tiny(seed=1)
    state = load(path, other, other_opt, other_sched)
    assert state["step"] == 3 and state["processes"] == 1
    for a, b in zip(model.parameters(), other.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b)


@pytest.mark.parametrize("harm, expected", [
    (lambda p: (p / "states.safetensors").write_bytes((p / "states.safetensors").read_bytes()[:-10]), "truncated"),
    (lambda p: (p / "scheduler.json").unlink(), "scheduler.json is missing"),
    (lambda p: (p / "trainer_state.json").write_text('{"step": 999999'), "trainer_state.json does not match"),
    (lambda p: (p / "manifest.json").write_text("{"), "no readable manifest"),
])
def test_a_damaged_checkpoint_is_detected_and_the_older_intact_one_is_used(tmp_path, harm, expected):
    model, optimizer, scheduler = tiny()
    save(tmp_path, 2, model, optimizer, scheduler)
    newest = save(tmp_path, 4, model, optimizer, scheduler)
    harm(newest)
    assert expected in checkpoint.damage(newest)
    path, notes = checkpoint.newest_intact(tmp_path)
    assert path.name == "checkpoint-000002" and "checkpoint-000004 is damaged" in notes[0]


def test_weights_that_are_not_this_models_or_not_finite_are_refused_before_anything_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model, optimizer, scheduler = tiny()
    path = save(tmp_path, 2, model, optimizer, scheduler)
    weights = load_file(str(path / "trainable.safetensors"))
    fresh = tiny(seed=5)
    before = [p.detach().clone() for p in fresh[0].parameters()]
    for name, change, message in (("nan", lambda w: {**w, "0.bias": torch.full_like(w["0.bias"], float("nan"))},
                                   "NaN"),
                                  ("missing", lambda w: {k: v for k, v in w.items() if k != "1.weight"}, "missing"),
                                  ("shape", lambda w: {**w, "1.bias": torch.zeros(7)}, "shape")):
        save_file(change(weights), str(path / "trainable.safetensors"))
        with pytest.raises(ValueError, match=message):
            load(path, *fresh)
        assert all(torch.equal(a, b) for a, b in zip(before, fresh[0].parameters())), name


def test_fsdp_checkpoints_gather_the_shards_and_every_process_resumes_its_own_rng(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), str(ROOT / "tests" / "fsdp_checkpoint_worker.py"),
                             str(tmp_path / "seen.json"), str(tmp_path / "ckpt")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["damage"] == "" and {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(seen["files"])
    assert seen["again"] == pytest.approx(seen["third"], abs=1e-6) and seen["third"][0] != seen["third"][1]
    # the gathered weights are the whole model: they load into an unsharded one
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "ckpt" / "checkpoint-000002" / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (128, 32)
