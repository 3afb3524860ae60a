"""`ftplan prices refresh` against a stubbed AWS Price List (botocore Stubber; moto has no pricing
backend): the filters, the traps, malformed rows, and the refreshed prices reaching estimates."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.stub import ANY, Stubber  # noqa: E402

from ftplan.data import aws_prices, catalog, price_cache  # noqa: E402
from ftplan.errors import PlannerError  # noqa: E402
from ftplan.estimate.cost import hourly_price  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


def item(instance_type: str, usd: str, *, region="us-east-1", family="Compute Instance", market="OnDemand",
         term="JRTCKXETXF", **extra) -> str:
    """One PriceList entry shaped like the real ones (a JSON string)."""
    attributes = {"instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
                  "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used", "marketoption": market,
                  "vcpu": "192", "gpu": "8", "networkPerformance": "3200 Gigabit", **extra}
    sku = "ABCDEF123456"
    return json.dumps({
        "product": {"productFamily": family, "attributes": attributes, "sku": sku},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {f"{sku}.{term}": {
            "effectiveDate": "2026-11-01T00:00:00Z", "offerTermCode": term, "sku": sku,
            "priceDimensions": {f"{sku}.{term}.6YS6EN2CT7": {
                "unit": "Hrs", "pricePerUnit": {"USD": usd}, "description": f"${usd} per On Demand Linux"}}}}},
        "version": "20261101", "publicationDate": "2026-11-01T00:00:00Z"})


def stubbed(responses):
    """A pricing client answering `responses`: (instance_type, region, service, [pages])."""
    client = boto3.client("pricing", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)
    for type_, region, service, pages in responses:
        filters = (aws_prices.ec2_filters(type_, region) if service == "AmazonEC2"
                   else aws_prices.sagemaker_filters(type_, region))
        for i, page in enumerate(pages):
            expected = {"ServiceCode": service, "Filters": filters, "FormatVersion": "aws_v1", "MaxResults": 100}
            if i:
                expected["NextToken"] = f"page{i}"
            response = {"PriceList": page, "FormatVersion": "aws_v1"}
            if i < len(pages) - 1:
                response["NextToken"] = f"page{i + 1}"
            stub.add_response("get_products", response, expected)
    stub.activate()
    return client, stub


def test_filters_select_the_on_demand_linux_shared_row_by_region_code():
    fields = {f["Field"]: f["Value"] for f in aws_prices.ec2_filters("p5.48xlarge", "eu-west-1")}
    assert fields == {"instanceType": "p5.48xlarge", "regionCode": "eu-west-1", "operatingSystem": "Linux",
                      "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
                      "marketoption": "OnDemand"}
    assert all(f["Type"] == "TERM_MATCH" for f in aws_prices.ec2_filters("g5.xlarge", "us-east-1"))


def test_refresh_reads_the_traps_right():
    client, stub = stubbed([
        # p5: a $0.00 capacity-block row must never win
        ("p5.48xlarge", "us-east-1", "AmazonEC2", [[item("p5.48xlarge", "0.0000000000"),
                                                    item("p5.48xlarge", "55.0400000000")]]),
        # bare metal lives in another product family, and pages arrive with NextToken
        ("g4dn.metal", "us-east-1", "AmazonEC2", [[], [item("g4dn.metal", "7.8240000000",
                                                            family="Compute Instance (bare metal)")]]),
        # a row for the wrong region (location-name confusion) is not this region's price
        ("g5.xlarge", "us-east-1", "AmazonEC2", [[item("g5.xlarge", "1.2", region="eu-west-1")]]),
        # malformed rows are reported, not fatal
        ("g6.xlarge", "us-east-1", "AmazonEC2", [["{not json", json.dumps({"product": {}}),
                                                  item("g6.xlarge", "lots"), item("g6.xlarge", "0.8048")]]),
    ])
    report = aws_prices.refresh(["us-east-1"], ["ec2"], ["p5.48xlarge", "g4dn.metal", "g5.xlarge", "g6.xlarge"],
                                client=client, today="2026-11-28")
    stub.assert_no_pending_responses()
    got = {p.instance_type: p.usd_per_hour for p in report.updated}
    assert got == {"p5.48xlarge": 55.04, "g4dn.metal": 7.824, "g6.xlarge": 0.8048}  # the good g6 row survives
    assert report.missing == ["g5.xlarge us-east-1 ec2"]
    assert len(report.errors) == 3 and all(e.startswith("g6.xlarge us-east-1 ec2: malformed") for e in report.errors)
    assert all("retrieved 2026-11-28" in p.source for p in report.updated)


def test_sagemaker_training_rates():
    row = item("ml.g5.2xlarge", "1.515", instanceName="ml.g5.2xlarge", component="Training")
    client, stub = stubbed([("g5.2xlarge", "us-east-1", "AmazonSageMaker", [[row]])])
    report = aws_prices.refresh(["us-east-1"], ["sagemaker"], ["g5.2xlarge"], client=client, today="2026-11-28")
    assert [(p.platform, p.usd_per_hour) for p in report.updated] == [("sagemaker", 1.515)]


def test_refreshed_prices_reach_estimates_and_plans():
    client, _ = stubbed([("g5.xlarge", "us-east-1", "AmazonEC2", [[item("g5.xlarge", "0.9990000000")]])])
    report = aws_prices.refresh(["us-east-1"], ["ec2"], ["g5.xlarge"], client=client, today="2026-11-28")
    price_cache.save_cache(report.updated)
    catalog.clear_caches()
    try:
        price = hourly_price(catalog.get_instance("g5.xlarge"))
        assert price.usd_per_hour == 0.999 and "retrieved 2026-11-28" in price.source and not price.warning
        bundled = hourly_price(catalog.get_instance("g5.2xlarge"))
        assert bundled.date == "2026-07-20" and "days old" in bundled.warning
        shown = run_cli("instances", "--json")
        g5 = next(i for i in json.loads(shown.stdout) if i["type"] == "g5.xlarge")
        assert g5["prices"][0]["usd_per_hour"] == 0.999
    finally:
        catalog.clear_caches()


def test_spot_prices_are_the_median_of_each_zones_latest():
    client = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)
    now = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
    rows = [{"InstanceType": "g5.xlarge", "AvailabilityZone": zone, "SpotPrice": price, "Timestamp": now - age,
             "ProductDescription": "Linux/UNIX"}
            for zone, price, age in (("us-east-1a", "0.50", timedelta(hours=5)), ("us-east-1a", "0.40", timedelta(0)),
                                     ("us-east-1b", "0.45", timedelta(hours=1)),
                                     ("us-east-1c", "0.60", timedelta(hours=2)))]
    stub.add_response("describe_spot_price_history", {"SpotPriceHistory": rows},
                      {"InstanceTypes": ["g5.xlarge"], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY,
                       "EndTime": ANY})
    stub.activate()
    report = aws_prices.refresh_spot(["us-east-1"], ["g5.xlarge"], client_for=lambda r: client, now=now)
    assert [(p.market, p.usd_per_hour) for p in report.updated] == [("spot", 0.45)]
    price_cache.save_cache(report.updated)
    catalog.clear_caches()
    try:
        spot = hourly_price(catalog.get_instance("g5.xlarge"), market="spot")
        assert spot.usd_per_hour == 0.45 and "DescribeSpotPriceHistory" in spot.source
        assert hourly_price(catalog.get_instance("g5.xlarge"), market="spot", spot_discount=0.5).usd_per_hour == 0.503
    finally:
        catalog.clear_caches()


def test_access_denied_and_missing_credentials_keep_the_bundled_prices(monkeypatch, tmp_path):
    client = boto3.client("pricing", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    stub = Stubber(client)
    stub.add_client_error("get_products", service_error_code="AccessDeniedException", http_status_code=400)
    stub.activate()
    with pytest.raises(PlannerError, match="refused the request \\(AccessDeniedException.*bundled prices stay"):
        aws_prices.refresh(["us-east-1"], ["ec2"], ["g5.xlarge"], client=client)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    env = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    result = run_cli("prices", "refresh", "--instances", "g5.xlarge", env=env)
    assert result.returncode == 2 and "no AWS credentials found" in result.stderr and "Traceback" not in result.stderr
    assert not price_cache.cache_path().exists()


def test_a_corrupt_cache_is_named(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text("{broken")
    with pytest.raises(PlannerError, match="unreadable; delete it"):
        price_cache.load_cache(path)


def test_a_missing_profile_is_named(monkeypatch):
    result = run_cli("prices", "refresh", "--instances", "g5.xlarge", env={"AWS_PROFILE": "nope",
                                                                            "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 2 and "AWS profile 'nope' does not exist" in result.stderr
