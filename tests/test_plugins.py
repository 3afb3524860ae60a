"""Plugins: a fake one registered and unregistered in process, broken ones reported by name,
entry points found in a fresh process, FTPLAN_PLUGINS as the way out, catalog entries."""

from __future__ import annotations

import json
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
    assert set(fake.backends()) == {"hf", "sagemaker", "lora-only"}
    assert fake.plugins["fake"].backends == ["lora-only"]
    fake.unregister("fake")
    assert set(fake.backends()) == {"hf", "sagemaker"}


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
    assert set(fake.backends()) == {"hf", "sagemaker", "lora-only"}
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
