"""Plans run where they were planned: the hf backend trains on this machine, so it refuses - before anything loads -
a plan for hardware that is not here (several instances, more GPUs, another GPU type) unless `--here` says to
train here anyway, and a one-GPU plan on a CPU-only machine runs with a warning."""

from __future__ import annotations

import os

import pytest
import yaml

from ftplan.backends.hf import hardware
from ftplan.cli.main import main
from ftplan.plan import load
from ftplan.run import registry as plugins
from ftplan.run.backend import RunRequest
from tests.conftest import run_cli

A10G = ("NVIDIA A10G", 23028 * 2**20)  # as nvidia-smi reports it on a g5.xlarge


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardware")
    made = run_cli("recommend", "llama2-7b", "--tokens", "5M", "--instances", "g5.xlarge", "--methods", "qlora",
                   "--max-gpus", "1", "--backend", "hf", "--yes", "-o", "one.yaml", cwd=root)
    assert made.returncode == 0, made.stderr
    plan = yaml.safe_load((root / "one.yaml").read_text())
    assert plan["hardware"]["gpu"] == "A10G" and plan["hardware"]["instance_count"] == 1
    t = plan["training"]  # the global batch stays micro-batch x accumulation x GPUs, as a plan must
    assert t["grad_accum"] % 4 == 0
    accum = t["grad_accum"]
    plan["hardware"]["instance_count"] = 2
    t["grad_accum"] = accum // 2
    (root / "two.yaml").write_text(yaml.safe_dump(plan))
    plan["hardware"].update(instance_count=1, gpus_per_instance=4)
    t["grad_accum"] = accum // 4
    (root / "four.yaml").write_text(yaml.safe_dump(plan))
    (root / "train.jsonl").write_text('{"text": "hello"}\n')
    return root


def call(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


@pytest.mark.parametrize("plan_gpu, memory, device, expected", [
    ("A10G", 24051816858, ("NVIDIA A10G", 23028 * 2**20), True),
    ("A100-80GB", 85899345920, ("NVIDIA A100-SXM4-80GB", 81920 * 2**20), True),
    ("A100-80GB", 85899345920, ("NVIDIA A100-SXM4-40GB", 40960 * 2**20), False),  # the other A100
    ("L4", 24051816858, ("NVIDIA L40S", 46068 * 2**20), False),                     # not a prefix match
    ("L40S", 47996259533, ("NVIDIA L40S", 46068 * 2**20), True),
    ("H100", 85899345920, ("NVIDIA H100 80GB HBM3", 81559 * 2**20), True),
    ("T4", 17179869184, ("Tesla T4", 0), True),                                     # memory unknown (/proc)
])
def test_a_device_is_the_plans_gpu(plan_gpu, memory, device, expected):
    assert hardware.is_gpu(plan_gpu, memory, *device) is expected


def test_cuda_visible_devices_limits_what_is_here(monkeypatch):
    gpus = [("NVIDIA A10G", 1), ("NVIDIA L4", 2)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hardware._visible(gpus) == [("NVIDIA L4", 2)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware._visible(gpus) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert hardware._visible(gpus) == gpus


@pytest.mark.parametrize("plan_name, gpus, mismatch", [
    ("two.yaml", [A10G], "the plan is for 2 x g5.xlarge (1 x A10G each) and this is one machine"),
    ("four.yaml", [A10G], "the plan needs 4 GPUs per instance and this machine has 1"),
    ("four.yaml", [], "the plan needs 4 GPUs per instance and this machine has none"),
    ("one.yaml", [("NVIDIA L4", 23034 * 2**20)], "the plan is for A10G GPUs and this machine has NVIDIA L4"),
])
def test_a_plan_for_other_hardware_is_refused_before_anything_loads(plans, monkeypatch, capsys, plan_name, gpus,
                                                                    mismatch):
    monkeypatch.chdir(plans)
    monkeypatch.setattr(hardware, "gpus_here", lambda: gpus)
    plugins.reset()
    before = sorted(p.name for p in plans.iterdir())
    code = call(["run", plan_name, "--data", "train.jsonl", "--output", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert mismatch in err[0] and "--backend skypilot" in err[0] and "--here" in err[0]
    assert sorted(p.name for p in plans.iterdir()) == before  # nothing written


def test_here_trains_anyway_and_says_so(plans, monkeypatch):
    monkeypatch.setattr(hardware, "gpus_here", lambda: [("NVIDIA L4", 23034 * 2**20)])
    backend = plugins.get_backend("hf")
    request = RunRequest(data=plans / "train.jsonl", output_dir=plans / "out", here=True)
    plan = load(plans / "one.yaml")
    options = backend.parse_options({})
    assert not any("A10G GPUs" in str(p) for p in backend.check(plan, request, options))
    assert backend.notices(plan, request, options) == [
        "--here: the plan is for A10G GPUs and this machine has NVIDIA L4; training here anyway"]


def test_the_plans_hardware_runs_without_a_word(plans, monkeypatch):
    monkeypatch.setattr(hardware, "gpus_here", lambda: [A10G])
    backend = plugins.get_backend("hf")
    request = RunRequest(data=plans / "train.jsonl", output_dir=plans / "out")
    assert backend.notices(load(plans / "one.yaml"), request, backend.parse_options({})) == []
    # a node of a multi-node rendezvous is one of the plan's instances
    two = load(plans / "two.yaml")
    options = backend.parse_options({"main_process_ip": "10.0.0.1", "machine_rank": 1})
    assert backend.fit(two, request, options).mismatches == []


def test_a_one_gpu_plan_on_a_cpu_only_machine_runs_with_a_warning(plans, monkeypatch):
    monkeypatch.setattr(hardware, "gpus_here", lambda: [])
    backend = plugins.get_backend("hf")
    request = RunRequest(data=plans / "train.jsonl", output_dir=plans / "out")
    fit = backend.fit(load(plans / "one.yaml"), request, backend.parse_options({}))
    assert fit.mismatches == [] and "this machine has no GPU, so it trains on the CPU" in fit.warnings[0]


def test_gpus_are_read_without_torch(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA A10G, 23028'\necho 'NVIDIA A10G, 23028'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hardware.gpus_here.cache_clear()
    try:
        assert hardware.gpus_here() == [A10G, A10G]
    finally:
        hardware.gpus_here.cache_clear()
