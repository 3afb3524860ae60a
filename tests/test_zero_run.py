"""ZeRO plans carried out under DeepSpeed itself - several processes over gloo on DeepSpeed's CPU accelerator,
started by `ftplan run` as on GPUs: the saved model is whole, a checkpoint resumes with the same losses (ZeRO-3
with a partition the process count leaves padded included), and an optimizer whose states ZeRO cannot
checkpoint by parameter is refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

from examples import tiny_model  # noqa: E402
from ftplan.plan import load, save  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

PLAN_ARGS = ("--seq-len", "64", "--batch-size", "1", "--instances", "g5.xlarge", "--max-gpus", "1", "--lr", "3e-3",
             "--priority", "cost", "--backend", "hf", "--yes", "--epochs", "2")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero")
    tiny_model.make_model(root / "tiny")
    tiny_model.text_data(root / "train.jsonl", n=32)
    return root


def zero_plan(ws: Path, method: str, sharding: str, global_batch: int, optimizer: str = "adamw_torch_fused") -> str:
    """recommend's plan for the tiny model, hand-edited to `sharding` (recommend plans DDP or FSDP) and `optimizer`."""
    name = f"{method}-{sharding}-{global_batch}-{optimizer}.yaml"
    made = run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--methods", method, "--global-batch",
                   str(global_batch), "-o", name, "--force", *PLAN_ARGS, cwd=ws)
    assert made.returncode == 0, made.stderr
    plan = load(ws / name)
    setup = plan.training.setup.model_copy(update={"optimizer": optimizer})
    save(plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"sharding": sharding}),
                                 "training": plan.training.model_copy(update={"setup": setup})}),
         ws / name, overwrite=True)
    return name


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize(("method", "sharding", "processes"),
                         [("lora", "zero3", 2), ("full", "zero2", 2), ("full", "zero3", 3)])
def test_zero_runs_save_whole_outputs_and_resume_with_the_same_losses(ws, method, sharding, processes):
    plan = zero_plan(ws, method, sharding, global_batch=2 * processes)
    ref, cut = ws / f"ref-{method}-{sharding}", ws / f"cut-{method}-{sharding}"
    args = ("--data", "train.jsonl", "--option", f"processes={processes}", "--max-steps", "4", "--save-every", "2",
            "--json")
    done = run_cli("run", plan, "--output", ref.name, *args, cwd=ws)
    assert done.returncode == 0, done.stderr
    notes = json.loads(done.stdout)["result"]["notes"]
    assert any(f"{processes} processes (DEEPSPEED)" in n for n in notes), notes
    assert (ref / "launch.sh").read_text().split("\n")[2].startswith("env CUDA_VISIBLE_DEVICES= "
                                                                     "ACCELERATE_USE_DEEPSPEED=true")
    saved = ref / "checkpoint-000002"
    assert json.loads((saved / "states.json").read_text())["format"] == "zero_full"  # by name, not one partition
    if method == "full":  # what `estimate --sharding zeroN` says one checkpoint weighs: fp32 masters + AdamW states
        estimate = run_cli("estimate", "./tiny", "--method", "full", "--sharding", sharding, "--gpus", "2",
                           "--optimizer", "adamw_torch_fused", "--json", cwd=ws)
        assert estimate.returncode == 0, estimate.stderr
        expected = _checkpoint_bytes(json.loads(estimate.stdout))
        on_disk = sum((saved / f).stat().st_size for f in ("model.safetensors", "states.safetensors"))
        assert expected <= on_disk <= expected * 1.05  # safetensors headers and the step counters on top
    _assert_whole(ws / "tiny", ref, method)
    # a fresh output holding only the step-2 checkpoint, as a node restores it from a bucket
    cut.mkdir()
    shutil.copytree(ref / "checkpoint-000002", cut / "checkpoint-000002")
    resumed = run_cli("run", plan, "--output", cut.name, "--resume", *args, cwd=ws)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"]["resumed_from_step"] == 2
    expected, got = losses(ref), losses(cut)
    assert sorted(got) == [3, 4]
    for step in got:  # step 3 needs the weights and every process's RNG, step 4 the optimizer states and the lr
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step


def _checkpoint_bytes(estimate: dict) -> int:
    (only,) = estimate["estimates"]
    return only["sharded"]["checkpoint_bytes"]


def _assert_whole(base: Path, out: Path, method: str) -> None:
    """The saved model loads, every tensor its full shape (ZeRO-3's own parameters are empty placeholders)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if method == "full":
        saved = load_file(str(out / "model" / "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in saved.items()} == \
            {k: tuple(v.shape) for k, v in model.state_dict().items()}
        AutoModelForCausalLM.from_pretrained(out / "model")
        return
    from peft import PeftModel

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert saved and all(v.numel() > 0 for v in saved.values())
    tuned = PeftModel.from_pretrained(model, out / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zeros PEFT initialises lora_B to


def test_an_eight_bit_optimizer_under_zero_is_refused_before_anything_is_written(ws):
    plan = zero_plan(ws, "full", "zero2", global_batch=4, optimizer="adamw_bnb_8bit")
    result = run_cli("run", plan, "--data", "train.jsonl", "--output", "refused", "--option", "processes=2", cwd=ws)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "quantised per block" in lines[-1] and "adamw_torch_fused" in lines[-1] and "Traceback" not in result.stderr
    assert not (ws / "refused").exists()
