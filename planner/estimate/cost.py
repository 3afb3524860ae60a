"""Dollars: hours x hourly price x instances, with the price's origin and the billing rules."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.errors import PlannerError
from ftplan.names import Name

# platforms are registered names: ec2 and sagemaker are bundled, plugins price their own (gcp, onprem...)
Platform = Name
Market = Literal["on-demand", "spot"]


class HourlyPrice(BaseModel):
    """The price of one instance-hour as used for a plan, and where it came from."""

    instance_type: str
    usd_per_hour: float
    region: str
    platform: Platform
    market: Market
    date: str
    source: str
    derived: str = Field("", description="how it was derived from a catalogued price, if it was")
    warning: str = Field("", description="set when the price is more than 90 days old")


def regions() -> set[str]:
    return {p.region for i in catalog.instances().values() for p in i.prices}


def check_region(region: str) -> None:
    known = regions()
    if region not in known:
        raise PlannerError(f"no prices for region '{region}'.{catalog.suggest(region, sorted(known))} "
                           f"Bundled prices cover: {', '.join(sorted(known))}")


def hourly_price(instance: catalog.Instance, region: str = "us-east-1", platform: Platform = "ec2",
                 market: Market = "on-demand", spot_discount: float | None = None) -> HourlyPrice | None:
    """The instance's hourly rate; None when no price is known for that region.

    Refreshed prices (ftplan prices refresh) come first; spot uses refreshed spot prices when there
    are any, else the on-demand rate less a discount (catalogued, or `spot_discount`).
    """
    if market == "spot" and platform == "ec2":
        spot = instance.price(region, "ec2", "spot")
        if spot is not None and spot_discount is None:
            return HourlyPrice(instance_type=instance.type, usd_per_hour=spot.usd_per_hour, region=region,
                               platform=platform, market=market, date=spot.date, source=spot.source,
                               warning=catalog.stale_warning(spot.date))
    base = instance.price(region, platform, "on-demand")
    derived, uplift = "", 1.0
    if platform == "sagemaker" and base is None:
        rules = catalog.pricing().sagemaker
        known = {k.type: k.usd_per_hour for k in rules.known}
        ec2 = instance.price(region, "ec2", "on-demand")
        if instance.type in known and region == "us-east-1":
            base = catalog.Price(usd_per_hour=known[instance.type], region=region, platform="sagemaker",
                                 market="on-demand", date=rules.known_date, source=rules.known_source)
        elif ec2 is not None:
            base, uplift = ec2, rules.uplift_over_ec2
            derived = f"EC2 rate x {rules.uplift_over_ec2} SageMaker uplift ({rules.source})"
    if base is None:
        return None
    usd = base.usd_per_hour * uplift
    if market == "spot":
        discount = catalog.pricing().spot.default_discount if spot_discount is None else spot_discount
        usd *= 1 - discount
        derived = "; ".join(filter(None, [derived, f"on-demand rate less an assumed {discount:.0%} spot discount"]))
    return HourlyPrice(instance_type=instance.type, usd_per_hour=usd, region=region, platform=platform, market=market,
                       date=base.date, source=base.source, derived=derived, warning=catalog.stale_warning(base.date))


def billed_seconds(seconds: float, platform: Platform) -> float:
    """Per-second billing with the platform's minimum charge."""
    minimum = catalog.pricing().minimum_seconds(platform)
    return max(math.ceil(seconds), minimum)


def cost_usd(seconds: float, price: HourlyPrice, count: int) -> float:
    """Dollars for `count` instances running `seconds` each."""
    return billed_seconds(seconds, price.platform) / 3600 * price.usd_per_hour * count
