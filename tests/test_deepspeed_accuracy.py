"""The DeepSpeed ZeRO model against DeepSpeed itself (benchmarks/results/deepspeed_cpu.jsonl, measured by
benchmarks/deepspeed_cpu.py: two gloo processes on DeepSpeed's CPU accelerator): today's sharded estimate must
stay within 3% on every recorded train case. Held-out cases are not asserted, so no change is tuned to them;
benchmarks/DEEPSPEED.md reports them. Needs neither DeepSpeed nor torch: the estimate is pure Python."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _benchmark():
    spec = importlib.util.spec_from_file_location("deepspeed_cpu", BENCH / "deepspeed_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark()
RECORDS = [json.loads(line) for line in (BENCH / "results" / "deepspeed_cpu.jsonl").read_text().splitlines()]
CASES = {case[0]: case for case in bench.CASES}


def test_every_record_is_a_case_of_the_matrix_with_its_split():
    assert sum(r["split"] == "train" for r in RECORDS) >= 3
    for r in RECORDS:
        assert r["id"] in CASES and CASES[r["id"]][4] == r["split"], r["id"]


@pytest.mark.parametrize("record", [r for r in RECORDS if r["split"] == "train"], ids=lambda r: r["id"])
def test_train_cases_stay_within_three_percent(record):
    estimated = bench.estimate(record["model"], record["stage"], record["setup"])["estimated_bytes"]
    assert abs(estimated - record["measured_bytes"]) / record["measured_bytes"] <= 0.03
