"""The memory model against published GPU measurements (benchmarks/memory_published.py): every figure is quoted from
its source, the committed report and catalog are today's model's, the README quotes today's figures, and estimate
and recommend show the published runs of a plan's method and sharding."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftplan.data import catalog
from ftplan.data.dataset import from_token_count
from ftplan.estimate.published import PublishedMemoryCheck, required_at
from ftplan.estimate.settings import SetupChoices
from ftplan.estimate.sharding import shard
from ftplan.model.inventory import layout_for
from ftplan.model.resolve import from_catalog
from ftplan.recommend.search import SearchRequest, search
from ftplan.render.recommend import memory_evidence_lines

from .conftest import benchmark_module, run_cli

ROOT = Path(__file__).resolve().parent.parent
runs = benchmark_module("time_runs")
published = benchmark_module("memory_published")


@pytest.fixture(scope="module")
def rows():
    return published.comparisons(runs.load())


UNITS = {"bytes": 1, "MiB": 2**20, "GiB": 2**30, "GB": 10**9}


def test_every_memory_figure_is_its_quote_in_the_unit_its_reading_names():
    figures = 0
    for rec in runs.records():
        for figure in rec.get("memory_measured", []):
            quoted = rec["quoted"] if isinstance(rec["quoted"], str) else " ".join(rec["quoted"])
            assert figure["quote"] in quoted, rec["id"]
            assert figure["basis"] in published.BASES, rec["id"]
            # the number the quote gives (after the sequence length or key it names), in the reading's unit, per GPU
            number = float(re.findall(r"[\d.]+", figure["quote"].split("=")[-1].split(": ")[-1])[0])
            unit = UNITS[figure["reading"].split(" ")[0].rstrip(":")]
            gpus = rec["gpus_per_node"] * rec["nodes"] if figure.get("per_gpu_from") else 1
            assert figure["bytes"] == pytest.approx(number * unit / gpus, abs=1), rec["id"]
            figures += 1
    assert figures >= 40


def test_each_measurement_is_compared_with_the_estimate_figure_of_its_kind(rows):
    for row in rows:
        c, rec = row["case"], row["case"].rec
        # the run's own GPUs and sharding, read from its record, as `estimate --gpus N --nodes M --sharding S`
        memory = shard(c.layout, c.setup, c.memory, gpus=rec["gpus_per_node"] * rec["nodes"], nodes=rec["nodes"],
                       sharding=rec["sharding"])
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


def _span(values, fmt: str = ".1f") -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}-{high}"


def test_the_readme_quotes_todays_figures(rows):
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for basis in ("torch_max_allocated", "device_used"):
        assert published.summary([r for r in rows if r["basis"] == basis]) in readme, basis
    groups = published.by_group(rows)
    mistral_full = {key: [r["error"] * 100 for r in groups["full", key] if "mistral" in r["case"].id]
                    for key in ("none", "fsdp")}
    assert f"Mistral-7B is within {max(map(abs, mistral_full['fsdp'])):.1f}% (one GPU: " \
           f"{max(map(abs, mistral_full['none'])):.1f}%" in readme
    adapters = [r for method in ("lora", "qlora") for r in groups[method, "none"]]
    sharded = [r for method in ("lora", "qlora") for r in groups[method, "fsdp"]]
    assert f"by {_span([-r['error'] * 100 for r in adapters], '.0f')}% on one GPU and " \
           f"{_span([-r['error'] * 100 for r in sharded])}% under FSDP" in readme
    lora = sorted(groups["lora", "none"], key=lambda r: r["case"].tokens_per_micro_batch)
    gaps = [f"{(r['measured'] - r['estimated']) / 2**30:.1f} GiB" for r in lora]
    assert f"{gaps[0]} at 4 x 4096 tokens, {gaps[1]} at 8 x 4096" in readme
    slopes = {key: published.gap_per_token(chosen) for key, chosen in groups.items()}
    assert f"gaps growing {_span(slopes['lora', 'none'] + slopes['qlora', 'none'])} KiB per token" in readme
    assert f"gaps grow {_span(slopes['lora', 'fsdp'] + slopes['qlora', 'fsdp'])} KiB per token" in readme
    santacoder = [r["error"] * 100 for r in rows if r["basis"] == "torch_max_allocated" and "-sc-" in r["case"].id]
    assert f"over-estimated by {_span(santacoder, '.0f')}%" in readme
    assert f"grows by {-min(slopes['full', 'none']):.1f} KiB per token" in readme
    gib, share = published.device_over_allocated(rows)
    assert f"held {_span(gib)} GiB ({_span([x * 100 for x in share], '.0f')}%) more than the allocated peak" in readme


def test_the_catalog_estimate_reads_is_todays_comparison(rows):
    committed = json.loads(published.CATALOG.read_text(encoding="utf-8"))
    assert committed == json.loads(json.dumps(published.catalog_groups(rows, committed["date"])))
    lora_one_gpu = next(g for g in committed["groups"] if (g["method"], g["sharding"]) == ("lora", "none"))
    ratios = [r["measured"] / r["estimated"] for r in rows if r["basis"] == "torch_max_allocated"
              and r["case"].setup.method == "lora" and r["case"].parallel.gpus == 1]
    assert lora_one_gpu["runs"] == len(ratios) and lora_one_gpu["measured_over_estimated"][1] == round(max(ratios), 3)


def test_estimate_shows_the_published_runs_of_its_method_and_sharding():
    groups = {(g.method, g.sharding): g for g in catalog.memory_validation().groups}
    one_gpu = json.loads(run_cli("estimate", "mistral-7b", "--method", "lora", "--json").stdout)["estimates"][0]
    assert one_gpu["published_check"]["measured_over_estimated"] == list(groups["lora", "none"].measured_over_estimated)
    fsdp = json.loads(run_cli("estimate", "mistral-7b", "--method", "qlora", "--gpus", "2", "--sharding", "fsdp",
                              "--json").stdout)["estimates"][0]
    assert fsdp["published_check"]["runs"] == groups["qlora", "fsdp"].runs
    # a DDP replica holds what one GPU holds; nothing published offloads, and nothing measured a CPU
    ddp = run_cli("estimate", "mistral-7b", "--method", "lora", "--gpus", "2", "--sharding", "ddp", "--json")
    assert json.loads(ddp.stdout)["estimates"][0]["published_check"] == one_gpu["published_check"]
    ddp_text = run_cli("estimate", "mistral-7b", "--method", "lora", "--gpus", "2", "--sharding", "ddp").stdout
    assert "lora on one GPU: on 2 published GPU runs" in ddp_text and "with ddp: on" not in ddp_text
    for extra in (("--gpus", "2", "--sharding", "fsdp", "--offload", "params"), ("--device", "cpu")):
        result = run_cli("estimate", "mistral-7b", "--method", "lora", *extra, "--json")
        assert json.loads(result.stdout)["estimates"][0]["published_check"] is None, extra
    text = run_cli("estimate", "mistral-7b", "--method", "qlora", "--gpus", "2", "--sharding", "fsdp").stdout
    low, high = groups["qlora", "fsdp"].measured_over_estimated
    assert f"qlora with fsdp: on {groups['qlora', 'fsdp'].runs} published GPU runs" in text
    assert f"{low:.2f}-{high:.2f}x this model's estimate" in text


def test_recommend_carries_the_published_memory_check_of_its_plan():
    entry = catalog.find_model("qwen2.5-0.5b")
    spec = from_catalog(entry)
    rec = search(spec, layout_for(spec)[0], from_token_count(1_000_000, 2048), SearchRequest(methods=["lora"]),
                 SetupChoices(seq_len=2048))
    best = rec.recommended
    group = next(g for g in catalog.memory_validation().groups if (g.method, g.sharding) == ("lora", "none"))
    assert best.sharding in ("none", "ddp") and rec.memory_evidence.runs == group.runs
    assert rec.memory_evidence.measured_over_estimated == group.measured_over_estimated
    assert rec.required_at_published_high_bytes == required_at(group.measured_over_estimated[1],
                                                               best.peak_allocated_bytes, best.required_bytes)
    assert rec.model_dump(mode="json")["memory_evidence"]["runs"] == rec.memory_evidence.runs


def _plan(peak_gib: float, required_gib: float, gpu_gib: float, ratios=(1.05, 1.15)):
    check = PublishedMemoryCheck(sharding="fsdp", runs=2, measured_over_estimated=ratios, sources=["Src"],
                                 models=["M"], validated="2026-12-02")
    peak, required = int(peak_gib * 2**30), int(required_gib * 2**30)
    plan = SimpleNamespace(method="lora", sharding="fsdp", peak_allocated_bytes=peak, required_bytes=required,
                           gpu_memory_bytes=int(gpu_gib * 2**30))
    return SimpleNamespace(recommended=plan, memory_evidence=check,
                           required_at_published_high_bytes=required_at(ratios[1], peak, required))


def test_the_need_at_a_published_ratio_scales_the_peak_and_its_slack_not_the_context():
    slack = catalog.memory_rules().allocator_slack
    assert required_at(1.15, 70 * 2**30, 74 * 2**30) == 74 * 2**30 + round(70 * 2**30 * 0.15 * (1 + slack))
    assert required_at(1.0, 70 * 2**30, 74 * 2**30) == 74 * 2**30


def test_recommend_warns_when_the_plan_would_not_fit_at_the_published_ratio():
    roomy = [" ".join(str(t).split()) for t in memory_evidence_lines(_plan(60, 64, 80))]
    assert roomy == ["Memory model on published GPU runs of lora with fsdp: peak allocated 1.05-1.15x the estimate "
                     "(2 runs: M, Src; benchmarks/MEMORY-PUBLISHED.md)"]
    tight = [" ".join(str(t).split()) for t in memory_evidence_lines(_plan(70, 74, 80))]
    assert "Caveat: at 1.15x this plan would need 85.03 GiB of the GPU's 80.00 GiB" in tight[1]
    assert memory_evidence_lines(SimpleNamespace(recommended=None, memory_evidence=None)) == []
