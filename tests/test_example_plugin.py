"""The worked example under examples/slurm-plugin, installed with pip as a user would and run end to end:
its catalog entries reach estimate, instances and recommend; its backend plans, dry-runs and trains the tiny
model through a stand-in `sbatch` that runs the batch script on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples import tiny_model
from tests.conftest import run_cli

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]

FAKE_SBATCH = """#!{python}
# Stands in for `sbatch --parsable --wait SCRIPT`: prints a job id, runs the script here, waits for it.
import re, subprocess, sys
script = sys.argv[-1]
log = re.search(r"^#SBATCH --output=(.+)$", open(script).read(), re.M).group(1)
print("4242", flush=True)
with open(log, "w") as out:
    sys.exit(subprocess.call(["bash", script], stdout=out, stderr=subprocess.STDOUT))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The example plugin pip-installed into its own folder, put on PYTHONPATH for the ftplan processes."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(ROOT / "examples" / "slurm-plugin")], check=True)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("slurm")
    tiny_model.make_model(ws / "tiny")
    tiny_model.text_data(ws / "train.jsonl", n=24)
    sbatch = ws / "fake-sbatch"
    sbatch.write_text(FAKE_SBATCH.format(python=sys.executable))
    sbatch.chmod(0o755)
    return ws


def test_the_plugin_lists_its_backend_options_and_hardware(installed):
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json", env=installed).stdout)}
    slurm = rows["slurm"]
    assert slurm["source"] == "entry point (ftplan-slurm-example)" and slurm["errors"] == []
    assert slurm["catalog_entries"] == 2
    [backend] = slurm["backends"]
    assert backend["platforms"] == ["onprem"]
    options = {o["key"]: o for o in backend["options"]}
    assert options["partition"]["default"] == "gpu" and options["partition"]["type"] == "str"
    listed = json.loads(run_cli("instances", "--json", env=installed).stdout)
    onprem = next(i for i in listed if i["type"] == "onprem-a100x8")
    assert onprem["prices"][0]["region"] == "dc1" and onprem["prices"][0]["platform"] == "onprem"


def test_its_hardware_is_priced_in_its_own_region(installed):
    result = run_cli("estimate", "llama2-7b", "--method", "qlora", "--instance", "onprem-a100x1", "--json",
                     env=installed)
    assert result.returncode == 0, result.stderr
    selected = json.loads(result.stdout)["estimates"][0]["selected"]
    assert selected["fits"] and selected["usd_per_hour"] == 1.5 and selected["price_source"].startswith("example")
    table = run_cli("estimate", "llama2-7b", "--method", "qlora", "--instance", "onprem-a100x1", env=installed)
    row = next(line for line in table.stdout.splitlines() if "onprem-a100x1" in line and "2026-11-01" in line)
    assert " 1.5 " in row and "no priced instance" not in table.stdout


def test_recommend_with_the_backend_plans_for_its_platform_and_a_run_trains_through_slurm(installed, work):
    env = {**installed}
    plan = work / "plan.yaml"
    made = run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "64", "--global-batch", "4",
                   "--methods", "lora", "--backend", "slurm", "--lr", "3e-3", "--yes", "-o", str(plan), cwd=work,
                   env=env)
    assert made.returncode == 0, made.stderr
    written = plan.read_text()
    assert "backend: slurm" in written and "platform: onprem" in written and "region: dc1" in written
    assert "instance_type: onprem-a100x1" in written
    dry = run_cli("run", "plan.yaml", "--data", "train.jsonl", "--dry-run", "--json", cwd=work, env=env)
    assert dry.returncode == 0, dry.stderr
    script = json.loads(dry.stdout)["script"]
    assert "#SBATCH --gpus-per-node=1" in script and "--backend hf --here" in script
    ran = run_cli("run", "plan.yaml", "--data", "train.jsonl", "--output", "out", "--max-steps", "4",
                  "--option", f"sbatch={work / 'fake-sbatch'}", "--option", "poll_seconds=0.2", "--json",
                  cwd=work, env=env)
    assert ran.returncode == 0, ran.stderr + ran.stdout
    out = work / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "slurm" and summary["result"]["steps"] == 4
    assert (out / "job" / "adapter" / "adapter_model.safetensors").exists() and (out / "job.sbatch").exists()
    # ftplan wrote metrics.jsonl from the events the backend handed over
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    again = run_cli("run", "plan.yaml", "--data", "train.jsonl", "--output", "out", "--max-steps", "2", "--force",
                    "--option", f"sbatch={work / 'fake-sbatch'}", "--option", "poll_seconds=0.2", "--json",
                    cwd=work, env=env)
    assert again.returncode == 0, again.stderr  # --force replaces the backend's own earlier output
