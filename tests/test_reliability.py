"""Cross-cutting guarantees: atomic writes survive a crash, checkpoints are never read half-written,
a broken plugin install is recoverable, and secrets or hostile paths in inputs go nowhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ftplan.data import calibration
from ftplan.data.files import atomic_write_text
from ftplan.errors import PlannerError
from tests.conftest import run_cli


@pytest.mark.parametrize("crash_in", ["fsync", "replace"])
def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch, crash_in):
    target = tmp_path / "plan.yaml"
    target.write_text("old plan")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, crash_in, crash)
    with pytest.raises(PlannerError, match="No space left on device"):
        atomic_write_text(target, "new plan " * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old plan"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


def test_calibration_cache_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    entry = calibration.Calibration(gpu="H100", model="m", method="lora", utilization=0.4, source="t", date="d")
    calibration.record(entry, path)
    before = path.read_text()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(PlannerError):
        calibration.record(entry.model_copy(update={"utilization": 0.9}), path)
    monkeypatch.undo()
    assert path.read_text() == before and calibration.lookup("H100", "m", "lora", path).utilization == 0.4


def test_resume_ignores_half_written_checkpoints(tmp_path):
    from ftplan.backends.hf import checkpoint

    good = tmp_path / "checkpoint-000004"
    good.mkdir()
    (good / "manifest.json").write_text("{}")               # only a manifest marks a checkpoint written whole
    (tmp_path / ".checkpoint-000006.tmp").mkdir()            # a crash while writing step 6
    (tmp_path / "checkpoint-000008").mkdir()                 # renamed by hand, never completed
    assert checkpoint.complete(tmp_path) == [good]
    checkpoint.remove_partial(tmp_path)
    assert not (tmp_path / ".checkpoint-000006.tmp").exists()


def write_dist(site: Path, name: str, source: str) -> None:
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ftplan]\n{name} = {name}\n")


def test_ftplan_plugins_env_recovers_from_a_plugin_that_kills_the_process(tmp_path):
    write_dist(tmp_path, "exits", "import sys\nsys.exit('plugin says bye')\n")
    write_dist(tmp_path, "kills", "import os\nos._exit(7)\n")
    env = {"PYTHONPATH": str(tmp_path)}
    broken = run_cli("plugins", "--json", env={**env, "FTPLAN_PLUGINS": "hf,exits"})
    assert broken.returncode == 0 and "plugin says bye" in broken.stdout      # sys.exit is caught and named
    dead = run_cli("instances", "--json", env=env)
    assert dead.returncode == 7                                              # os._exit cannot be caught...
    recovered = run_cli("instances", "--json", env={**env, "FTPLAN_PLUGINS": "hf"})
    assert recovered.returncode == 0 and json.loads(recovered.stdout)        # ...but FTPLAN_PLUGINS recovers


def test_remote_code_never_runs_without_the_flag(tmp_path):
    marker = tmp_path / "executed"
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil_arch", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 100, "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                        "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    result = run_cli("estimate", str(model))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not marker.exists()


SECRET = "hf_SECRETTOKEN1234567890"
AWS_SECRET = "AKIASECRETSECRET/abcdEFGHijklMNOPqrstUVWXyz"


def test_secrets_in_the_environment_never_reach_output_files_or_plans(tmp_path):
    pytest.importorskip("torch")
    from examples import tiny_model

    tiny_model.make_model(tmp_path / "tiny")
    tiny_model.text_data(tmp_path / "train.jsonl", n=8)
    env = {"HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_SESSION_TOKEN": SECRET}
    results = [
        run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "2",
                "--methods", "lora", "--max-gpus", "1", "--backend", "hf", "--yes", env=env, cwd=tmp_path),
        run_cli("run", "--data", "train.jsonl", "--max-steps", "2", env=env, cwd=tmp_path),
        run_cli("plan", "show", env=env, cwd=tmp_path),
        run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--platform", "sagemaker",
                "--backend", "sagemaker", "--max-gpus", "1", "--yes", "-o", "sm.yaml", env=env, cwd=tmp_path),
        run_cli("run", "sm.yaml", "--data", "train.jsonl", "--dry-run", "--option", "role=arn:aws:iam::1:role/r",
                "--option", "bucket=b", env=env, cwd=tmp_path),
    ]
    for r in results:
        assert r.returncode == 0, r.stderr
        assert SECRET not in r.stdout + r.stderr and AWS_SECRET not in r.stdout + r.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".jsonl", ".txt", ""):
            text = path.read_bytes()
            assert SECRET.encode() not in text and AWS_SECRET.encode() not in text, path


def test_hostile_paths_in_a_plan_cannot_write_outside_the_output_directory(tmp_path):
    pytest.importorskip("torch")
    import yaml

    from examples import tiny_model

    work = tmp_path / "work"
    tiny_model.make_model(work / "tiny")
    tiny_model.text_data(work / "train.jsonl", n=8)
    assert run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "2",
                   "--methods", "lora", "--max-gpus", "1", "--backend", "hf", "--yes", cwd=work).returncode == 0
    plan = yaml.safe_load((work / "ftplan-plan.yaml").read_text())
    plan["model"]["name"] = "../../../escaped"
    plan["training"]["data_source"] = "/etc/passwd"
    (work / "ftplan-plan.yaml").write_text(yaml.safe_dump(plan))
    before = {p for p in tmp_path.rglob("*")}
    result = run_cli("run", "--data", "train.jsonl", "--max-steps", "1", "--output", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(work / "out" in p.parents or p == work / "out" for p in new), sorted(map(str, new))


EVIL_PLUGIN = """
from ftplan.data import catalog
from ftplan.run.hookspecs import hookimpl


def price(usd):
    return [{"usd_per_hour": usd, "region": "us-east-1", "platform": "ec2", "market": "on-demand",
             "date": "2026-11-01", "source": "x"}]


@hookimpl
def register_catalog_entries(register_gpu, register_instance):
    l4, g5 = catalog.get_gpu("L4").model_dump(), catalog.get_instance("g5.xlarge").model_dump()
    register_gpu({**l4, "name": "Zero-TFLOPS", "aliases": [], "fp16_tflops": 0, "bf16_tflops": 0})
    register_instance({**g5, "type": "zero.1", "gpu": "Zero-TFLOPS", "prices": price(0.01)})
    register_gpu({**l4, "name": "Tiny-TFLOPS", "aliases": [], "fp16_tflops": 1e-300, "bf16_tflops": 1e-300})
    register_instance({**g5, "type": "tiny.1", "gpu": "Tiny-TFLOPS", "prices": price(0.01)})
    register_instance({**g5, "type": "negative.1", "prices": price(-5)})
    register_instance({**g5, "type": "free.1", "prices": price(0)})
    register_instance({**g5, "type": "huge.1", "prices": price(1e300)})
    register_instance({**g5, "type": "cheap.1", "prices": price(0.01)})   # sane: it may win
"""


def test_absurd_plugin_hardware_never_reaches_recommends_ranking(tmp_path):
    write_dist(tmp_path, "evil_plugin", EVIL_PLUGIN)
    env = {"PYTHONPATH": str(tmp_path)}
    rec = run_cli("recommend", "llama2-7b", "--tokens", "1M", "--json", env=env)
    assert rec.returncode == 0, rec.stderr
    data = json.loads(rec.stdout, parse_constant=lambda c: pytest.fail(f"{c} in recommend --json"))
    ranked = {c["instance_type"] for c in [data["recommended"], *data["candidates"], *data["frontier"]]}
    assert data["recommended"]["instance_type"] == "cheap.1"
    assert not ranked & {"zero.1", "tiny.1", "negative.1", "free.1", "huge.1"}
    errors = {r["name"]: r["errors"] for r in json.loads(run_cli("plugins", "--json", env=env).stdout)}["evil_plugin"]
    assert len(errors) == 7 and any("fp16_tflops" in e or "bf16_tflops" in e for e in errors)
    assert any("less than or equal to 100000" in e for e in errors)
    refused = run_cli("recommend", "llama2-7b", "--tokens", "1M", "--instances", "tiny.1", env=env)
    assert refused.returncode == 2 and "unknown instance type 'tiny.1'" in refused.stderr


@pytest.mark.parametrize("usd", [float("inf"), float("nan"), 1e300, -1.0])
def test_a_price_cache_holding_absurd_prices_is_refused_in_one_line(tmp_path, usd):
    home = tmp_path / "home"
    home.mkdir()
    (home / "prices.json").write_text(json.dumps({"schema_version": 1, "prices": [
        {"instance_type": "g5.xlarge", "usd_per_hour": usd, "region": "us-east-1", "platform": "ec2",
         "market": "on-demand", "date": "2026-11-01", "source": "x"}]}))
    for args in (("prices", "show", "--json"), ("recommend", "llama2-7b", "--tokens", "1M", "--json")):
        result = run_cli(*args, env={"FTPLAN_HOME": str(home)})
        assert result.returncode == 2 and result.stdout == "", result.stdout[:200]  # no half, invalid JSON
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "prices.0.usd_per_hour" in lines[0] and "delete it" in lines[0], lines
