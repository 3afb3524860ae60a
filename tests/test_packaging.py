"""The estimate path stays light, and the wheel carries the catalogs."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


@pytest.mark.parametrize("args", [["estimate", "llama3-8b", "--json"],
                                  ["recommend", "llama3-8b", "--tokens", "1M", "--json"], ["plugins", "--json"]])
def test_planning_commands_import_nothing_heavy(args):
    code = ("import sys\nfrom ftplan.cli.main import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_estimate_does_not_load_plugins():
    code = ("import sys\nfrom ftplan.cli.main import main\n"
            "try:\n    main(['estimate', 'llama3-8b', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('pluggy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tracked sources (a stale build/ folder cannot leak into it)."""
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True)
    return next(out.glob("ftplan-*.whl"))


def test_wheel_holds_one_import_package_with_the_catalogs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("models.json", "gpus.json", "aws_instances.json", "peft_default_targets.json", "throughput.json",
                 "pricing.json", "quality.json"):
        assert f"ftplan/catalogs/{data}" in names
    assert "ftplan/cli/main.py" in names and "ftplan/backends/hf/loop.py" in names
    assert "ftplan/run/hookspecs.py" in names and "ftplan/backends/sagemaker/entry.py" in names
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"ftplan"}
    packages = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("planner/**/__init__.py")} | \
        {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("plugins/**/__init__.py")}
    for folder in packages:  # every package folder is listed in pyproject, so none is left out of the wheel
        inside = folder.replace("planner", "ftplan", 1).replace("plugins", "ftplan/backends", 1)
        assert f"{inside}/__init__.py" in names, folder


def _dependencies() -> set[str]:
    """Distribution names ftplan needs at run time (its base requirements, recursively)."""
    seen, todo = set(), ["ftplan"]
    while todo:
        dist = metadata.distribution(todo.pop())
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = req.name
            if name.lower() not in seen:
                seen.add(name.lower())
                todo.append(name)
    return seen


def test_the_wheel_works_from_a_folder_with_its_own_planner_plugins_and_catalogs(wheel, tmp_path):
    """Installed into a fresh virtual environment, ftplan finds its bundled backends and catalogs even where
    the current folder holds packages named like the repository's folders (they used to shadow them)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    # dependencies: linked from this environment (nothing downloads), ftplan's own editable install left out
    deps = tmp_path / "deps"
    deps.mkdir()
    for name in _dependencies():
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (deps / top).exists():
                (deps / top).symlink_to(source)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(str(deps) + "\n")
    decoys = tmp_path / "work"
    for package in ("planner", "plugins", "catalogs"):
        (decoys / package).mkdir(parents=True)
        (decoys / package / "__init__.py").write_text("raise ImportError('a decoy package was imported')\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "FTPLAN_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(decoys)}
    ftplan = str(venv / "bin" / "ftplan")
    listed = subprocess.run([ftplan, "plugins", "--json"], cwd=decoys, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["hf"]["errors"] == [] and rows["sagemaker"]["errors"] == []
    assert rows["hf"]["source"] == "bundled" and rows["hf"]["backends"][0]["name"] == "hf"
    estimated = subprocess.run([ftplan, "estimate", "llama2-7b", "--method", "qlora", "--json"], cwd=decoys, env=env,
                               capture_output=True, text=True)
    assert estimated.returncode == 0, estimated.stderr
    assert json.loads(estimated.stdout)["estimates"][0]["trainable_params"] == 8_388_608
    module = subprocess.run([str(venv / "bin" / "python"), "-m", "ftplan", "--version"], cwd=decoys, env=env,
                            capture_output=True, text=True)
    assert module.returncode == 0 and "0.1.0" in module.stdout


def test_catalog_has_every_reference_model_with_sources():
    from ftplan.data import catalog

    assert len(catalog.models()) >= 45
    for m in catalog.models():
        assert m.source and m.license and m.hf_id
    for i in catalog.instances().values():
        for p in i.prices:
            assert p.date and p.source
