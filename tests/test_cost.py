"""Prices and billing: hand-computed dollars, spot and SageMaker derivations, calibration."""

import pytest

from ftplan.data import calibration, catalog
from ftplan.errors import PlannerError
from ftplan.estimate.cost import billed_seconds, check_region, cost_usd, hourly_price


def test_on_demand_price_carries_its_date_and_source():
    p = hourly_price(catalog.get_instance("p4d.24xlarge"))
    assert p.usd_per_hour == 21.957642
    assert p.date == "2026-07-20" and "Price List" in p.source and p.derived == ""


def test_cost_is_hours_times_rate_times_instances_with_per_second_billing():
    p = hourly_price(catalog.get_instance("g5.xlarge"))  # $1.006/h
    assert cost_usd(3600, p, 2) == pytest.approx(2 * 1.006)
    assert cost_usd(30, p, 1) == pytest.approx(60 / 3600 * 1.006)   # one-minute minimum on EC2
    assert billed_seconds(90.2, "ec2") == 91


def test_spot_applies_the_catalogued_or_given_discount_and_says_so():
    inst = catalog.get_instance("g5.xlarge")
    default = hourly_price(inst, market="spot")
    assert default.usd_per_hour == pytest.approx(1.006 * 0.4)
    assert "60% spot discount" in default.derived
    assert hourly_price(inst, market="spot", spot_discount=0.7).usd_per_hour == pytest.approx(1.006 * 0.3)


def test_sagemaker_uses_known_rates_else_a_marked_uplift():
    known = hourly_price(catalog.get_instance("g5.2xlarge"), platform="sagemaker")
    assert known.usd_per_hour == 1.515 and "unverified" in known.source and known.derived == ""
    derived = hourly_price(catalog.get_instance("g6.xlarge"), platform="sagemaker")
    assert derived.usd_per_hour == pytest.approx(0.8048 * 1.25)
    assert "uplift" in derived.derived
    assert billed_seconds(30, "sagemaker") == 30


def test_unknown_region_names_the_known_ones():
    with pytest.raises(PlannerError, match="Catalogued prices cover: us-east-1"):
        check_region("mars-north-1")
    assert hourly_price(catalog.get_instance("g5.xlarge"), region="eu-west-1") is None


def test_calibration_round_trip_and_lookup(tmp_path):
    path = tmp_path / "calibration.json"
    assert calibration.lookup("H100", "llama2-7b", "lora", path) is None
    entry = calibration.Calibration(gpu="H100", model="llama2-7b", method="lora", utilization=0.41,
                                    source="ftplan measure", date="2026-11-28")
    calibration.record(entry, path)
    calibration.record(entry.model_copy(update={"utilization": 0.45}), path)
    assert calibration.lookup("h100", "LLAMA2-7B", "lora", path).utilization == 0.45
    assert len(calibration.load(path).entries) == 1
    path.write_text("{not json")
    with pytest.raises(PlannerError, match="unreadable"):
        calibration.load(path)


@pytest.mark.parametrize("name, memory, expected", [("NVIDIA A100-SXM4-80GB", 85e9, "A100-80GB"),
                                                    ("NVIDIA A100-SXM4-40GB", 42e9, "A100-40GB"),
                                                    ("NVIDIA H200", 150e9, "H200"), ("NVIDIA L4", 24e9, "L4"),
                                                    ("NVIDIA GeForce RTX 4090", 24e9, "RTX 4090"),
                                                    ("NVIDIA A100-PCIE-40GB", 42e9, "A100-PCIe-40GB"),
                                                    ("NVIDIA H100 PCIe", 85e9, "H100-PCIe"),
                                                    ("NVIDIA H100 NVL", 99e9, "H100 NVL"),
                                                    ("Quadro RTX 8000", 48e9, None)])
def test_cuda_device_names_map_to_catalogued_gpus(name, memory, expected):
    gpu = calibration.gpu_for_device(name, int(memory))
    assert (gpu.name if gpu else None) == expected
