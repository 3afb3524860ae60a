"""The memory model against published GPU measurements (benchmarks/memory_published.py): every figure is quoted from
its source, the committed report is today's model's, and the README quotes today's figures."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


runs = _module("time_runs")
published = _module("memory_published")


@pytest.fixture(scope="module")
def rows():
    return published.comparisons(runs.load())


def test_every_memory_figure_is_quoted_from_its_source_with_what_it_measured():
    figures = 0
    for rec in runs.records():
        for figure in rec.get("memory_measured", []):
            quoted = rec["quoted"] if isinstance(rec["quoted"], str) else " ".join(rec["quoted"])
            assert figure["quote"] in quoted, rec["id"]
            assert figure["basis"] in published.BASES and figure["bytes"] > 0 and figure["reading"], rec["id"]
            figures += 1
    assert figures >= 40


def test_each_measurement_is_compared_with_the_estimate_figure_of_its_kind(rows):
    for row in rows:
        memory = published.estimated(row["case"])
        expected = memory.peak_allocated_bytes if row["basis"] == "torch_max_allocated" else memory.required_bytes
        assert row["estimated"] == expected
        assert row["error"] == pytest.approx(expected / row["measured"] - 1)
    # allocated and device figures of one run differ: the allocator's cache and the CUDA context
    assert {r["basis"] for r in rows} == set(published.BASES)


def test_the_committed_report_is_todays_model(rows):
    committed = published.REPORT.read_text(encoding="utf-8")
    date = committed.split("Generated ", 1)[1].split(" ", 1)[0]
    assert published.report(rows, date).rstrip("\n") == committed.rstrip("\n"), \
        "run python benchmarks/memory_published.py"


def test_the_readme_quotes_todays_figures(rows):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for basis in ("torch_max_allocated", "device_used"):
        assert published.summary([r for r in rows if r["basis"] == basis]) in readme, basis
