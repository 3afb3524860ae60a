"""The estimate path stays light, and the wheel carries the catalogs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


@pytest.mark.parametrize("args", [["estimate", "llama3-8b", "--json"],
                                  ["recommend", "llama3-8b", "--tokens", "1M", "--json"], ["plugins", "--json"]])
def test_planning_commands_import_nothing_heavy(args):
    code = ("import sys\nfrom planner.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_estimate_does_not_load_plugins():
    code = ("import sys\nfrom planner.cli import main\n"
            "try:\n    main(['estimate', 'llama3-8b', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('pluggy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_wheel_contains_catalogs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("ftplan-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("models.json", "gpus.json", "aws_instances.json", "peft_default_targets.json", "throughput.json",
                 "pricing.json", "quality.json"):
        assert f"catalogs/{data}" in names
    assert "planner/cli.py" in names and "plugins/hf/loop.py" in names and "planner/hookspecs.py" in names
    assert "plugins/sagemaker/entry.py" in names


def test_catalog_has_every_reference_model_with_sources():
    from planner import catalog

    assert len(catalog.models()) >= 45
    for m in catalog.models():
        assert m.source and m.license and m.hf_id
    for i in catalog.instances().values():
        for p in i.prices:
            assert p.date and p.source
