"""Plugins: a fake one registered and unregistered in process, broken ones reported by name,
entry points found in a fresh process, FTPLAN_PLUGINS as the way out, catalog entries."""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.run import registry as plugins
from ftplan.run.backend import RunRequest, RunResult, TrainerBackend
from ftplan.run.hookspecs import hookimpl
from tests.conftest import run_cli


class LoraOnly(TrainerBackend):
    name = "lora-only"
    description = "a test backend that trains LoRA only"
    methods = ("lora",)

    def check(self, plan, request, options):
        return self.supports(plan)

    def run(self, plan, request, options, progress):  # pragma: no cover - check refuses first
        return RunResult(output_dir=request.output_dir, artifacts=[], steps=0, total_steps=0, first_loss=None,
                         final_loss=None, tokens=0, seconds=0, tokens_per_second=0, peak_memory_bytes=None,
                         device="cpu")


class FakePlugin:
    @hookimpl
    def register_backends(self, register):
        register(LoraOnly())


@pytest.fixture
def registry():
    plugins.reset()
    reg = plugins.registry()
    yield reg
    plugins.reset()


@pytest.fixture
def fake(registry):
    registry.register(FakePlugin(), "fake")
    yield registry
    registry.unregister("fake")


def test_bundled_backend_comes_through_the_public_hook(registry):
    assert "hf" in registry.backends() and registry.plugins["hf"].source == "bundled"
    assert registry.plugins["hf"].backends == ["hf"] and not registry.broken()


def test_a_registered_fake_backend_is_listed_then_gone(fake):
    assert set(fake.backends()) == {"hf", "sagemaker", "skypilot", "lora-only"}
    assert fake.plugins["fake"].backends == ["lora-only"]
    fake.unregister("fake")
    assert set(fake.backends()) == {"hf", "sagemaker", "skypilot"}


def test_check_refuses_a_method_the_backend_does_not_train(fake, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    assert run_cli("recommend", "llama2-7b", "--tokens", "1M", "--methods", "full", "--yes", "-o", str(plan_file),
                   "--priority", "cost").returncode == 0
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    request = RunRequest(data=tmp_path / "d.jsonl", output_dir=tmp_path / "out")
    from ftplan.run.execute import prepare

    with pytest.raises(PlannerError, match=r"backend 'lora-only' does not train full \(it supports lora\).*"
                                           r"fix: re-plan with ftplan recommend --backend lora-only"):
        prepare(plan_file, request, backend_name="lora-only", raw_options={}, force=False)
    with pytest.raises(PlannerError, match="no trainer backend named 'nope' .*available: hf, lora-only, sagemaker"):
        prepare(plan_file, request, backend_name="nope", raw_options={}, force=False)
    with pytest.raises(PlannerError, match="--option surprise: is not an option of backend 'lora-only' "
                                           r"\(its options: none\); see ftplan plugins"):
        LoraOnly().parse_options({"surprise": 1})
    assert not (tmp_path / "out").exists()


class Raises:
    @hookimpl
    def register_backends(self, register):
        raise RuntimeError("boom")


class Garbage:
    @hookimpl
    def register_backends(self, register):
        register("not a backend")


class Duplicate:
    @hookimpl
    def register_backends(self, register):
        register(LoraOnly())


class UnknownHook:
    @hookimpl
    def register_trainers(self, register):  # not a ftplan hook
        pass


def test_broken_plugins_are_reported_by_name_and_the_rest_keep_working(fake):
    for name, plugin in (("raises", Raises()), ("garbage", Garbage()), ("dup", Duplicate())):
        fake.register(plugin, name)
    assert fake.register(UnknownHook(), "unknown") is False
    assert set(fake.backends()) == {"hf", "sagemaker", "skypilot", "lora-only"}
    broken = fake.broken()
    assert "RuntimeError: boom" in broken["raises"][0]
    assert "not a TrainerBackend" in broken["garbage"][0]
    assert "already registered" in broken["dup"][0]
    assert "register_trainers" in broken["unknown"][0]
    for name in ("raises", "garbage", "dup", "unknown"):
        fake.unregister(name)


class AddsHardware:
    @hookimpl
    def register_catalog_entries(self, register_model, register_gpu, register_instance):
        gpu = catalog.get_gpu("A100-80GB").model_dump()
        register_gpu({**gpu, "name": "OnPrem-A100"})
        register_instance({**catalog.get_instance("p4de.24xlarge").model_dump(), "type": "onprem.8xa100",
                           "gpu": "OnPrem-A100"})
        register_instance({**catalog.get_instance("g5.xlarge").model_dump()})  # a duplicate: refused


def test_catalog_entries_from_a_plugin_extend_never_replace(registry):
    registry.register(AddsHardware(), "hardware")
    registry.catalog_entries()
    try:
        assert catalog.get_instance("onprem.8xa100").gpu == "OnPrem-A100"
        assert catalog.get_gpu("onprem-a100").memory_bytes == catalog.get_gpu("A100-80GB").memory_bytes
        assert "already catalogued" in registry.broken()["hardware"][0]
        assert catalog.get_instance("g5.xlarge").gpu == "A10G"
    finally:
        plugins.reset()
    with pytest.raises(PlannerError):
        catalog.get_instance("onprem.8xa100")


def write_dist(site, name: str, module_source: str, entry: str) -> None:
    """A minimal installed distribution with an `ftplan` entry point, as pip would leave it."""
    (site / f"{name}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[ftplan]\n{entry} = {name}\n")


def test_entry_point_plugins_load_and_broken_ones_are_named(tmp_path):
    write_dist(tmp_path, "good_plugin", """
        from ftplan.run.backend import TrainerBackend
        from ftplan.run.hookspecs import hookimpl

        class Echo(TrainerBackend):
            name = "echo"
            description = "says what it would do"
            methods = ("lora",)
            def check(self, plan, request, options):
                return self.supports(plan)
            def run(self, plan, request, options, progress):
                raise NotImplementedError

        @hookimpl
        def register_backends(register):
            register(Echo())
    """, "good")
    write_dist(tmp_path, "bad_plugin", "import does_not_exist\n", "bad")
    env = {"PYTHONPATH": str(tmp_path)}
    listed = run_cli("plugins", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["good"]["version"] == "1.2.3" and rows["good"]["backends"][0]["name"] == "echo"
    assert "entry point (good_plugin)" == rows["good"]["source"]
    assert "No module named 'does_not_exist'" in rows["bad"]["errors"][0]
    assert rows["hf"]["errors"] == []
    table = run_cli("plugins", env={**env, "COLUMNS": "250"})
    assert "bad" in table.stdout and "failed to import" in table.stdout
    assert rows["sagemaker"]["backends"][0]["platforms"] == ["sagemaker"]
    only_good = json.loads(run_cli("plugins", "--json", env={**env, "FTPLAN_PLUGINS": "good"}).stdout)
    assert [r["name"] for r in only_good] == ["good"]
    none = json.loads(run_cli("plugins", "--json", env={**env, "FTPLAN_PLUGINS": ""}).stdout)
    assert none == []


def test_catalog_plugin_through_an_entry_point_reaches_every_command(tmp_path):
    write_dist(tmp_path, "onprem_plugin", """
        from ftplan.data import catalog
        from ftplan.run.hookspecs import hookimpl

        @hookimpl
        def register_catalog_entries(register_model, register_gpu, register_instance):
            register_instance({**catalog.get_instance("p4de.24xlarge").model_dump(), "type": "onprem.8xa100",
                               "prices": [{"usd_per_hour": 9.5, "region": "us-east-1", "platform": "ec2",
                                           "market": "on-demand", "date": "2026-11-01", "source": "our invoice"}]})
    """, "onprem")
    env = {"PYTHONPATH": str(tmp_path)}
    listed = json.loads(run_cli("instances", "--json", env=env).stdout)
    assert "onprem.8xa100" in [i["type"] for i in listed]
    est = run_cli("estimate", "llama2-7b", "--method", "qlora", "--instance", "onprem.8xa100", "--json", env=env)
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["estimates"][0]["selected"]["usd_per_hour"] == 9.5
    rec = run_cli("recommend", "llama2-7b", "--tokens", "1M", "--instances", "onprem.8xa100", "--json", env=env)
    assert json.loads(rec.stdout)["recommended"]["price"]["source"] == "our invoice"
    assert run_cli("instances", "--json", env={**env, "FTPLAN_PLUGINS": "hf"}).stdout.count("onprem") == 0


# -- hooks through pluggy ---------------------------------------------------------------------------------------

class OnlyGpus:
    @hookimpl
    def register_catalog_entries(self, register_gpu):  # takes only the argument it uses
        register_gpu({**catalog.get_gpu("L4").model_dump(), "name": "Lab-L4", "aliases": []})


class First:
    @hookimpl(tryfirst=True)
    def register_backends(self, register):
        register(type("Shared", (LoraOnly,), {"name": "shared", "description": "from First"})())


class Later:
    @hookimpl
    def register_backends(self, register):
        register(type("Shared", (LoraOnly,), {"name": "shared", "description": "from Later"})())


class Exits:
    @hookimpl
    def register_backends(self, register):
        raise SystemExit(3)


class Interrupts:
    @hookimpl
    def register_catalog_entries(self, register_gpu):
        raise KeyboardInterrupt


class BadEntries:
    @hookimpl
    def register_catalog_entries(self, register_gpu, register_instance):
        register_gpu({**catalog.get_gpu("L4").model_dump(), "name": "Zero-TFLOPS", "fp16_tflops": 0})
        register_instance({**catalog.get_instance("g5.xlarge").model_dump(), "type": "negative.1",
                           "prices": [{"usd_per_hour": -5, "region": "us-east-1", "platform": "ec2",
                                       "market": "on-demand", "date": "2026-11-01", "source": "x"}]})


def test_an_implementation_may_take_only_the_arguments_it_uses(registry):
    registry.register(OnlyGpus(), "only-gpus")
    registry.catalog_entries()
    try:
        assert not registry.broken() and catalog.get_gpu("lab-l4").memory_bytes == catalog.get_gpu("L4").memory_bytes
    finally:
        plugins.reset()


def test_tryfirst_decides_who_keeps_a_name_and_the_other_is_reported(registry):
    registry.register(Later(), "later")
    registry.register(First(), "first")  # registered last, but tryfirst
    assert registry.backends()["shared"].description == "from First"
    assert "already registered" in registry.broken()["later"][0]


def test_system_exit_and_keyboard_interrupt_in_a_hook_are_contained(registry):
    registry.register(Exits(), "exits")
    registry.register(Interrupts(), "interrupts")
    registry.catalog_entries()
    assert {"hf", "sagemaker"} <= set(registry.backends())
    assert "SystemExit" in registry.broken()["exits"][0] and "KeyboardInterrupt" in registry.broken()["interrupts"][0]


def test_catalog_entries_that_would_corrupt_figures_are_refused(registry):
    registry.register(BadEntries(), "bad-entries")
    registry.catalog_entries()
    errors = registry.broken()["bad-entries"]
    assert any("fp16_tflops" in e for e in errors) and any("usd_per_hour" in e for e in errors)
    with pytest.raises(PlannerError):
        catalog.get_instance("negative.1")


def test_hook_calls_can_be_traced_for_plugin_authors():
    traced = run_cli("plugins", "--json", env={"FTPLAN_TRACE_HOOKS": "1"})
    assert traced.returncode == 0 and "register_backends [hook]" in traced.stderr and "finish register_backends" in \
        traced.stderr


def test_ftplan_plugins_naming_what_is_not_installed_says_so_and_a_filtered_backend_is_explained(tmp_path):
    rows = {r["name"]: r for r in json.loads(run_cli("plugins", "--json", env={"FTPLAN_PLUGINS": "hf,nope"}).stdout)}
    assert "not installed" in rows["nope"]["errors"][0] and rows["hf"]["errors"] == []
    plan = tmp_path / "plan.yaml"
    assert run_cli("recommend", "llama2-7b", "--tokens", "1M", "--platform", "sagemaker", "--yes", "-o",
                   str(plan)).returncode == 0
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    refused = run_cli("run", str(plan), "--data", str(tmp_path / "d.jsonl"), env={"FTPLAN_PLUGINS": "hf"})
    assert refused.returncode == 2 and "FTPLAN_PLUGINS='hf' leaves its plugin out" in refused.stderr


def test_a_third_party_entry_point_named_like_a_bundled_one_is_reported(tmp_path):
    write_dist(tmp_path, "impostor", """
        from ftplan.api import hookimpl

        @hookimpl
        def register_backends(register):
            raise AssertionError("never loaded")
    """, "hf")
    rows = json.loads(run_cli("plugins", "--json", env={"PYTHONPATH": str(tmp_path)}).stdout)
    bundled = next(r for r in rows if r["name"] == "hf")
    impostor = next(r for r in rows if r["name"].startswith("hf ("))
    assert bundled["source"] == "bundled" and bundled["errors"] == []
    assert "already taken" in impostor["errors"][0]


def test_recommend_with_a_backend_searches_only_its_methods_and_platforms(fake, tmp_path):
    from ftplan.run.registry import backend_for

    backend, platform, methods, why = backend_for("lora-only", None, ["full", "lora", "qlora"])
    assert (backend.name, platform, methods, why) == ("lora-only", "ec2", ["lora"], "requested")
    with pytest.raises(PlannerError, match="runs on ec2, not sagemaker"):
        backend_for("lora-only", "sagemaker", ["lora"])
    with pytest.raises(PlannerError, match="trains lora, none of --methods full"):
        backend_for("lora-only", None, ["full"])
    assert backend_for(None, "sagemaker", ["qlora"])[0].name == "sagemaker"


# -- the run contract, enforced by ftplan for every backend ---------------------------------------------------

CONTRACT_PLUGIN = """
    import os, signal, time
    from pathlib import Path
    from ftplan.api import BackendOptions, ProgressEvent, RunResult, TrainerBackend, hookimpl

    class Options(BackendOptions):
        mode: str = "ok"

    class Contract(TrainerBackend):
        name = "contract"
        description = "a backend that does what its --option mode says"
        methods = ("full", "lora", "qlora")
        platforms = ("ec2",)
        options_model = Options
        owned_patterns = ("weights.bin",)

        def check(self, plan, request, options):
            if options.mode == "check-raises":
                raise RuntimeError("check blew up")
            return self.supports(plan)

        def checkpoint_step(self, request, options):
            return 2 if (request.output_dir / "weights.bin").exists() else None

        def run(self, plan, request, options, progress):
            out = request.output_dir
            start = request.resume_step or 0
            for step in range(start + 1, start + 4):
                progress(ProgressEvent(step=step, total_steps=3 + start, epoch=0.1 * step, loss=1.0 / step,
                                       learning_rate=1e-4, tokens=10 * step, tokens_per_second=10.0,
                                       elapsed_seconds=float(step), eta_seconds=1.0, peak_memory_bytes=None))
                if options.mode == "wait-signal" and step == start + 1:
                    Path(os.environ["READY_FILE"]).write_text("ready")
                    time.sleep(60)  # SIGTERM arrives here, as KeyboardInterrupt
            if options.mode == "run-raises":
                raise ValueError("the GPU caught fire")
            (out / "weights.bin").write_bytes(b"w")
            artifacts = ["weights.bin"] + (["../escaped.txt"] if options.mode == "escape" else [])
            return RunResult(output_dir=out, artifacts=artifacts, steps=start + 3, total_steps=start + 3,
                             first_loss=1.0, final_loss=0.3, tokens=30, seconds=3.0, tokens_per_second=10.0,
                             peak_memory_bytes=None, device="cpu")

    @hookimpl
    def register_backends(register):
        register(Contract())
"""


@pytest.fixture
def contract(tmp_path):
    write_dist(tmp_path, "contract_plugin", CONTRACT_PLUGIN, "contract")
    plan = tmp_path / "plan.yaml"
    assert run_cli("recommend", "llama2-7b", "--tokens", "1M", "--backend", "contract", "--yes", "-o", str(plan),
                   env={"PYTHONPATH": str(tmp_path)}).returncode == 0
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')

    def run(*args, mode="ok", env=None):
        return run_cli("run", str(plan), "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "out"),
                       "--option", f"mode={mode}", *args, env={"PYTHONPATH": str(tmp_path), **(env or {})})
    return tmp_path, run


def test_ftplan_writes_metrics_plan_and_summary_for_a_backend_and_force_replaces_its_output(contract):
    where, run = contract
    first = run()
    assert first.returncode == 0, first.stderr
    out = where / "out"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert {"plan.yaml", "summary.json", "weights.bin", ".ftplan-run.json"} <= {p.name for p in out.iterdir()}
    assert run().returncode == 2  # not empty
    assert run("--force").returncode == 0  # the backend's own weights.bin counts as ftplan's


def test_resume_asks_the_backend_for_its_checkpoint_and_drops_later_metrics(contract):
    where, run = contract
    assert run().returncode == 0
    with open(where / "out" / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "torn')  # a kill mid-append
    resumed = run("--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line)["step"] for line in (where / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # kept up to the checkpoint (2), then the resumed run's 3..5


def test_a_backend_exception_is_one_line_and_leaves_nothing_half_written(contract):
    where, run = contract
    for mode, message in (("check-raises", "failed in check: RuntimeError: check blew up"),
                          ("run-raises", "failed in run: ValueError: the GPU caught fire")):
        result = run(mode=mode)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
    assert not (where / "out" / "summary.json").exists()


def test_an_artifact_outside_the_output_is_refused(contract):
    where, run = contract
    result = run(mode="escape")
    assert result.returncode == 2 and "artifact outside --output" in result.stderr


def test_sigterm_reaches_a_third_party_backend_as_ctrl_c_does(contract, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    where, _ = contract
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(where), "HF_HUB_OFFLINE": "1", "READY_FILE": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "ftplan", "run", str(where / "plan.yaml"), "--data",
                             str(where / "d.jsonl"), "--output", str(where / "out"), "--option", "mode=wait-signal",
                             "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    summary = json.loads((where / "out" / "summary.json").read_text())
    assert summary["result"]["interrupted"] and summary["result"]["steps"] == 1
