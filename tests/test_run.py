"""`ftplan recommend --yes` then `ftplan run` on a tiny local Llama, for full, LoRA and QLoRA:
the loss falls, outputs reload, resume continues exactly, and the run refuses what it cannot do."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("peft")

from examples import tiny_model as tinymodel  # noqa: E402
from ftplan.errors import PlannerError  # noqa: E402
from ftplan.plan import load  # noqa: E402
from ftplan.run.backend import RunRequest  # noqa: E402
from ftplan.run.execute import execute, prepare  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

# --backend hf: these plans train here (with skypilot installed, an EC2 plan would name skypilot)
PLAN_ARGS = ("--seq-len", "64", "--global-batch", "4", "--instances", "g5.xlarge", "--max-gpus", "1",
             "--lr", "3e-3", "--priority", "cost", "--backend", "hf", "--yes")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model with its tokenizer, and training data, made once for the module."""
    root = tmp_path_factory.mktemp("run")
    tinymodel.make_model(root / "tiny")
    tinymodel.text_data(root / "train.jsonl", n=64)
    tinymodel.text_data(root / "eval.jsonl", n=8, seed=9)
    return root


def make_plan(workdir: Path, method: str, name: str | None = None, *extra: str) -> Path:
    plan = workdir / f"{name or method}.yaml"
    result = run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--methods", method, "-o", plan.name,
                     "--force", *PLAN_ARGS, *extra, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return plan


def losses(output: Path) -> dict[int, float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["loss"] for e in map(json.loads, lines)}


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_recommend_then_run_trains_and_the_loss_falls(workdir, method):
    plan = make_plan(workdir, method, None, "--epochs", "2")
    out = workdir / f"out-{method}"
    as_json = ["--json"] if method == "qlora" else []  # the JSON contract with the heaviest imports (bitsandbytes)
    result = run_cli("run", plan.name, "--data", "train.jsonl", "--eval-data", "eval.jsonl", "--output", out.name,
                     *as_json, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if as_json:  # stdout is the summary alone
        assert json.loads(result.stdout) == json.loads((out / "summary.json").read_text())
    curve = list(losses(out).values())
    assert len(curve) == load(plan).training.optimizer_steps == 32
    assert sum(curve[-4:]) / 4 < 0.95 * sum(curve[:4]) / 4   # at least 5% lower, far beyond step noise
    written = {p.name for p in out.iterdir()}
    folder = "model" if method == "full" else "adapter"
    assert {"metrics.jsonl", "plan.yaml", "summary.json", folder} <= written
    assert (out / folder / "tokenizer.json").exists()  # beside the weights, as Hugging Face loaders expect
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"]["eval_loss"] is not None and summary["result"]["device"] == "cpu"
    if method != "full":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        assert not list(out.glob("adapter/*.bin"))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(workdir, method, monkeypatch):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftplan.backends.hf import loop
    from ftplan.train.build import _load_quantized, weight_dtype

    plan_path = make_plan(workdir, method, f"{method}-logits")
    batch = loop.data.collate([([1, 5, 9, 13, 17, 21, 25, 29], [1] * 8)], pad_id=3)
    seen = {}
    original = loop._save_final

    def capture(model, tokenizer, output_dir, full, procs):
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(**batch).logits.float()
        return original(model, tokenizer, output_dir, full, procs)

    monkeypatch.setattr(loop, "_save_final", capture)
    request = RunRequest(data=workdir / "train.jsonl", output_dir=workdir / f"logits-{method}", max_steps=6)
    plan, backend, options = prepare(plan_path, request, backend_name=None, raw_options={}, force=False)
    execute(plan, backend, options, request, lambda event: None)

    # reload as a user would: the base from its safetensors (4-bit for QLoRA, prepared as for training), then PEFT
    setup = plan.training.setup
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(_load_quantized(str(workdir / "tiny"), setup, "cpu", False),
                                               use_gradient_checkpointing=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(str(workdir / "tiny"), dtype=weight_dtype(setup),
                                                    use_safetensors=True)
    reloaded = PeftModel.from_pretrained(base, str(request.output_dir / "adapter"))
    reloaded.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the training forward ran
        logits = reloaded(**batch).logits.float()
    assert torch.allclose(logits, seen["logits"], atol=1e-4, rtol=0), (logits - seen["logits"]).abs().max()
    assert not torch.allclose(seen["logits"], torch.zeros_like(logits))


def _start_run(workdir: Path, plan: Path, out: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ftplan", "run", plan.name, "--data", "train.jsonl", "--output",
                             out, "--save-every", "2", "--json", *extra], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir: Path, out: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    metrics = workdir / out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail("run did not reach the step in time")


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_run_resumes_with_the_same_losses(workdir, how):
    plan = make_plan(workdir, "lora", f"resume-{how.name}", "--epochs", "3")
    reference = run_cli("run", plan.name, "--data", "train.jsonl", "--output", f"ref-{how.name}", "--json",
                        cwd=workdir)
    assert reference.returncode == 0, reference.stderr
    expected = losses(workdir / f"ref-{how.name}")
    out = f"cut-{how.name}"
    cut = random.randint(2, 9)  # any point must do; the step is printed when the test fails
    print(f"interrupting with {how.name} after step {cut}")
    proc = _start_run(workdir, plan, out)
    _wait_for_step(workdir, out, cut, proc)
    proc.send_signal(how)
    proc.wait(timeout=120)
    if how == signal.SIGKILL:
        assert proc.returncode == -9
    else:
        assert proc.returncode == 130 and "--resume" in proc.stderr.read()
    done = sorted(p.name for p in (workdir / out).glob("checkpoint-*"))
    assert done and not list((workdir / out).glob(".checkpoint-*.tmp.*"))
    cut_at = int(done[-1].split("-")[1])
    assert cut_at < len(expected)
    resumed = run_cli("run", plan.name, "--data", "train.jsonl", "--output", out, "--resume", "--json", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["result"]["resumed_from_step"] == cut_at
    got = losses(workdir / out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_a_finished_run_is_not_overwritten_without_force(workdir):
    plan = make_plan(workdir, "lora", "overwrite")
    out = workdir / "out-overwrite"
    assert run_cli("run", plan.name, "--data", "train.jsonl", "--output", out.name, "--max-steps", "2",
                   cwd=workdir).returncode == 0
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_cli("run", plan.name, "--data", "train.jsonl", "--output", out.name, cwd=workdir)
    assert again.returncode == 2 and "not empty; pass --force" in again.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    forced = run_cli("run", plan.name, "--data", "train.jsonl", "--output", out.name, "--force", cwd=workdir)
    assert forced.returncode == 2 and "ftplan did not write (notes.txt)" in forced.stderr


def test_chat_and_prompt_completion_data(workdir):
    from transformers import AutoTokenizer

    from ftplan.backends.hf import data

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    ids, labels = data.encode({"prompt": "the cat sat", "completion": " on the mat"}, tok, 64, "x")
    prompt_len = len(tok("the cat sat")["input_ids"])
    assert labels[:prompt_len] == [data.IGNORE] * prompt_len and labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tok.eos_token_id
    chat_ids, chat_labels = data.encode({"messages": [{"role": "user", "content": "one two"},
                                                      {"role": "assistant", "content": "three"}]}, tok, 64, "x")
    assert tok.decode(chat_ids).count("</s>") == 2 and chat_labels == chat_ids
    for maker in (tinymodel.prompt_data, tinymodel.chat_data):
        path = maker(workdir / f"{maker.__name__}.jsonl")
        plan = make_plan(workdir, "lora", f"fmt-{maker.__name__}")
        result = run_cli("run", plan.name, "--data", path.name, "--output", f"out-{maker.__name__}",
                         "--max-steps", "3", cwd=workdir)
        assert result.returncode == 0, result.stderr


def test_a_saved_datasets_directory_is_training_data(workdir):
    datasets = pytest.importorskip("datasets")
    from ftplan.backends.hf.data import read_records

    rows = [{"text": s} for s in tinymodel.sentences(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(workdir / "hfdata"))
    assert read_records(workdir / "hfdata") == rows
    with pytest.raises(PlannerError, match="not a saved Hugging Face dataset"):
        read_records(workdir)


def test_run_refuses_a_different_architecture_and_pickle_weights(workdir, tmp_path):
    import torch

    plan = make_plan(workdir, "lora", "arch")
    other = tmp_path / "other"
    tinymodel.make_model(other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 32
    (other / "config.json").write_text(json.dumps(config))
    wrong = run_cli("run", str(plan), "--data", str(workdir / "train.jsonl"), "--model-path", str(other),
                    "--output", str(tmp_path / "o1"))
    assert wrong.returncode == 2 and "not the architecture the plan was made for" in wrong.stderr
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (pickled / f).write_bytes((workdir / "tiny" / f).read_bytes())
    torch.save({}, pickled / "pytorch_model.bin")
    refused = run_cli("run", str(plan), "--data", str(workdir / "train.jsonl"), "--model-path", str(pickled),
                      "--output", str(tmp_path / "o2"))
    assert refused.returncode == 2 and "never loads pickle" in refused.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_two_processes_on_the_cpu_train_with_ddp_and_write_one_set_of_outputs(workdir):
    plan = make_plan(workdir, "lora", "ddp", "--batch-size", "1", "--epochs", "2")
    out = workdir / "out-ddp"
    result = run_cli("run", plan.name, "--data", "train.jsonl", "--output", out.name, "--option", "processes=2",
                     "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert any("2 processes (MULTI_CPU)" in n for n in summary["result"]["notes"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == list(range(1, len(steps) + 1))           # one line per step: only process 0 logs
    curve = [json.loads(line)["loss"] for line in lines]
    assert sum(curve[-4:]) / 4 < 0.97 * sum(curve[:4]) / 4
    config = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "MULTI_CPU" and config["num_processes"] == 2
    assert "torch.distributed.run" in (out / "launch.sh").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not list(out.glob(".re*.json"))
    # each process accumulates 2 of the plan's 4 micro-batches: reduced once per step under no_sync, as the
    # Trainer; with the plan's sync_each_batch after every micro-batch - the same gradients, so the same losses
    assert any("no_sync over the first 1 of its 2 micro-batches" in n for n in summary["result"]["notes"])
    synced = workdir / "synced.yaml"
    synced.write_text((workdir / plan.name).read_text().replace("sync_each_batch: false", "sync_each_batch: true"))
    again = run_cli("run", synced.name, "--data", "train.jsonl", "--output", "out-synced", "--option",
                    "processes=2", "--json", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert any("reduced every micro-batch" in n for n in json.loads(again.stdout)["result"]["notes"])
    assert losses(workdir / "out-synced") == pytest.approx(losses(out), rel=1e-5)


def test_generated_accelerate_configs_follow_the_plans_sharding(workdir):
    from ftplan.backends.hf.launch import accelerate_config

    plan = load(make_plan(workdir, "lora", "cfg"))
    for sharding, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        p = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"sharding": sharding,
                                                                                 "instance_count": 2})})
        config = accelerate_config(p, processes=16, machines=2, machine_rank=1, main_ip="10.0.0.1", main_port=29500,
                                   cpu=False)
        assert config["distributed_type"] == kind and config["num_machines"] == 2 and config["machine_rank"] == 1
        assert config["main_process_ip"] == "10.0.0.1" and config["num_processes"] == 16
    assert config["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_plans_run_with_the_buckets_the_estimate_models(workdir, stage):
    """A ZeRO plan's DeepSpeed settings go in a config file accelerate reads, with the Trainer's "auto" buckets
    (hidden^2), not DeepSpeed's 5e8-element default: accelerate's own plugin fills them as the estimate assumes."""
    from accelerate.utils import DeepSpeedPlugin

    from ftplan.backends.hf.launch import accelerate_config, deepspeed_config

    plan = load(make_plan(workdir, "full", "cfg"))
    plan = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"sharding": f"zero{stage}"})})
    path = workdir / "deepspeed_config.json"
    world = plan.hardware.instance_count * plan.hardware.gpus_per_instance
    t = plan.training.model_copy(update={"grad_accum": 4, "global_batch": plan.training.setup.batch_size * 4 * world})
    plan = plan.model_copy(update={"training": t})
    for processes, accum in ((world, 4), (world * 2, 2), (world * 4, 1)):
        written = deepspeed_config(plan, processes)
        # the loop prepares no dataloader, so the micro-batch, the accumulation and the clipping are written out;
        # whatever the process count, one optimizer step is the plan's global batch
        assert written["train_micro_batch_size_per_gpu"] == t.setup.batch_size
        assert written["gradient_accumulation_steps"] == accum
        assert written["train_batch_size"] == t.global_batch
        assert written["gradient_clipping"] == t.max_grad_norm
    path.write_text(json.dumps(written))
    config = accelerate_config(plan, processes=8, machines=1, machine_rank=0, main_ip="127.0.0.1", main_port=29500,
                               cpu=False, deepspeed_file=path)
    assert config["distributed_type"] == "DEEPSPEED"
    assert config["deepspeed_config"] == {"deepspeed_config_file": str(path), "zero3_init_flag": stage == 3}
    # accelerate's launcher, reading this config: a mixed_precision key beside the DeepSpeed config file would be
    # passed on, and DeepSpeedPlugin would refuse to start ("the following accelerate config variables will be
    # ignored") - the precision is the DeepSpeed config's, and the worker's Accelerator agrees with it
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from ftplan.backends.hf.loop import mixed_precision

    yaml_path = workdir / "accelerate_config.yaml"
    yaml_path.write_text(yaml.safe_dump(config))
    _, _, precision_from_config = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(yaml_path), "train.py"]))
    assert not precision_from_config
    assert written["bf16"] == {"enabled": plan.training.setup.precision.startswith("bf16")}
    plugin = DeepSpeedPlugin(hf_ds_config=str(path), zero3_init_flag=False)
    hidden = 64
    # what accelerate's prepare() passes for this run and a model of this hidden size
    plugin.deepspeed_config_process(must_match=False, **{
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden})
    plugin.set_mixed_precision(mixed_precision(plan))  # what the worker's Accelerator does with it
    assert plugin.deepspeed_config["bf16"]["enabled"] == plan.training.setup.precision.startswith("bf16")
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == stage and zero["reduce_bucket_size"] == hidden * hidden
    assert "overlap_comm" not in zero  # DeepSpeed's default by stage, as ftplan.estimate.deepspeed assumes
