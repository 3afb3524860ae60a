"""`ftplan prices refresh`: today's rates from the AWS Price List Query API, cached per user.

EC2 on-demand rows are filtered to exactly the Linux, shared-tenancy, no-preinstalled-software,
used-capacity on-demand rate (without `marketoption=OnDemand`, p5 also returns a $0.00 Capacity
Block row; bare-metal types sit in another product family; regions are matched by `regionCode`,
not by location name). SageMaker training rates come from AmazonSageMaker with
`component=Training`. Spot prices come from EC2 DescribeSpotPriceHistory. boto3 is imported
only here, only when refreshing.
"""

from __future__ import annotations

import json
import statistics
from datetime import date, datetime, timedelta, timezone

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.data.aws import aws_error
from ftplan.data.aws import client as aws_client
from ftplan.data.price_cache import CachedPrice

PRICING_ENDPOINT_REGION = "us-east-1"  # the Price List API answers in us-east-1, eu-central-1, ap-south-1
ON_DEMAND_TERM = "JRTCKXETXF"


class RefreshReport(BaseModel):
    """What a refresh found, per instance type and region."""

    updated: list[CachedPrice] = []
    missing: list[str] = Field([], description="'type region platform' with no matching product")
    errors: list[str] = Field([], description="malformed rows, with the instance type they were for")
    path: str | None = None


def ec2_filters(instance_type: str, region: str) -> list[dict]:
    """GetProducts filters that select exactly the on-demand Linux shared-tenancy row."""
    fields = {"instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux", "tenancy": "Shared",
              "preInstalledSw": "NA", "capacitystatus": "Used", "marketoption": "OnDemand"}
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in fields.items()]


def sagemaker_filters(instance_type: str, region: str) -> list[dict]:
    fields = {"instanceName": f"ml.{instance_type}", "regionCode": region, "component": "Training"}
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in fields.items()]


def on_demand_rate(item: str, expect: dict[str, str]) -> float | None:
    """The hourly USD rate of one PriceList entry (a JSON string), None when the row is not the one
    asked for (other attributes, a $0.00 capacity-block row). ValueError when malformed."""
    try:
        data = json.loads(item)
        attributes = data["product"]["attributes"]
        terms = data["terms"]["OnDemand"]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"malformed Price List entry ({type(exc).__name__}: {exc})") from None
    if any(attributes.get(k) != v for k, v in expect.items()):
        return None
    rates = []
    for term_key, term in terms.items():
        if not term_key.endswith(ON_DEMAND_TERM) and expect.get("marketoption"):
            continue
        for dim in term.get("priceDimensions", {}).values():
            if dim.get("unit") != "Hrs":
                continue
            try:
                rates.append(float(dim["pricePerUnit"]["USD"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError("malformed priceDimensions (no numeric pricePerUnit.USD)") from None
    positive = [r for r in rates if r > 0]  # a $0.00 row is a capacity block or a reservation artefact
    return min(positive) if positive else None


def _products(client, service: str, filters: list[dict]) -> list[str]:
    items, token = [], None
    while True:
        kwargs = {"ServiceCode": service, "Filters": filters, "FormatVersion": "aws_v1", "MaxResults": 100}
        if token:
            kwargs["NextToken"] = token
        page = client.get_products(**kwargs)
        items += page.get("PriceList", [])
        token = page.get("NextToken")
        if not token:
            return items


def refresh(regions: list[str], platforms: list[str], instance_types: list[str] | None = None, *,
            client=None, today: str | None = None) -> RefreshReport:
    """Query the Price List for every catalogued (or given) instance type in `regions` and `platforms`."""
    from botocore.exceptions import BotoCoreError, ClientError

    today = today or date.today().isoformat()
    types = instance_types or list(catalog.instances())
    report = RefreshReport()
    try:
        client = client or aws_client("pricing", PRICING_ENDPOINT_REGION, need="refreshing prices")
        for platform in platforms:
            service = "AmazonEC2" if platform == "ec2" else "AmazonSageMaker"
            for region in regions:
                for type_ in types:
                    if platform == "ec2":
                        filters = ec2_filters(type_, region)
                    else:
                        filters = sagemaker_filters(type_, region)
                    expect = {f["Field"]: f["Value"] for f in filters}
                    rates = []
                    for item in _products(client, service, filters):
                        try:
                            rate = on_demand_rate(item, expect)
                        except ValueError as exc:
                            report.errors.append(f"{type_} {region} {platform}: {exc}")
                            continue
                        if rate is not None:
                            rates.append(rate)
                    if not rates:
                        report.missing.append(f"{type_} {region} {platform}")
                        continue
                    report.updated.append(CachedPrice(
                        instance_type=type_, usd_per_hour=min(rates), region=region, platform=platform,
                        market="on-demand", date=today,
                        source=f"AWS Price List API ({service} GetProducts), retrieved {today}"))
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc) from None
    return report


def refresh_spot(regions: list[str], instance_types: list[str] | None = None, *, client_for=None,
                 now: datetime | None = None) -> RefreshReport:
    """Recent EC2 spot prices: the median over availability zones of each zone's latest price (last day)."""
    from botocore.exceptions import BotoCoreError, ClientError

    now = now or datetime.now(timezone.utc)
    types = instance_types or list(catalog.instances())
    report = RefreshReport()
    try:
        for region in regions:
            client = client_for(region) if client_for else aws_client("ec2", region, need="refreshing spot prices")
            latest: dict[tuple[str, str], tuple[datetime, float]] = {}
            token = None
            while True:
                kwargs = {"InstanceTypes": types, "ProductDescriptions": ["Linux/UNIX"],
                          "StartTime": now - timedelta(days=1), "EndTime": now}
                if token:
                    kwargs["NextToken"] = token
                page = client.describe_spot_price_history(**kwargs)
                for row in page.get("SpotPriceHistory", []):
                    try:
                        key = (row["InstanceType"], row["AvailabilityZone"])
                        stamp, price = row["Timestamp"], float(row["SpotPrice"])
                    except (KeyError, TypeError, ValueError):
                        report.errors.append(f"{region}: malformed spot price row")
                        continue
                    if price > 0 and (key not in latest or stamp > latest[key][0]):
                        latest[key] = (stamp, price)
                token = page.get("NextToken")
                if not token:
                    break
            for type_ in types:
                prices = [p for (t, _), (_, p) in latest.items() if t == type_]
                if not prices:
                    report.missing.append(f"{type_} {region} spot")
                    continue
                report.updated.append(CachedPrice(
                    instance_type=type_, usd_per_hour=statistics.median(prices), region=region, platform="ec2",
                    market="spot", date=now.date().isoformat(),
                    source=f"EC2 DescribeSpotPriceHistory, median of {len(prices)} zone(s), "
                           f"retrieved {now.date().isoformat()}"))
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc) from None
    return report
