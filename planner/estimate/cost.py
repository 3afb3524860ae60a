"""Dollars: hours x hourly price x instances, with the price's origin and the billing rules."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ftplan.data import catalog
from ftplan.data.price import Price
from ftplan.errors import PlannerError
from ftplan.names import Name

# platforms are registered names: ec2 and sagemaker are bundled, plugins price their own (gcp, onprem...)
Platform = Name
Market = Literal["on-demand", "spot"]


class HourlyPrice(Price):
    """The price of one instance-hour as used for a plan, where it came from, and how it was derived."""

    instance_type: str
    derived: str = Field("", description="how it was derived from a catalogued price, if it was")
    warning: str = Field("", description="set when the price is more than 90 days old")


BUNDLED_PLATFORMS = ("ec2", "sagemaker")  # SageMaker rates derive from EC2's where none is catalogued


def platforms() -> set[str]:
    """Every platform with prices: the bundled ones and those plugins' catalog entries name."""
    return set(BUNDLED_PLATFORMS) | {p.platform for i in catalog.instances().values() for p in i.prices}


def regions(platform: str = "ec2") -> set[str]:
    """Regions with prices on `platform` (SageMaker: its own and EC2's, from which its rates derive)."""
    wanted = {platform, "ec2"} if platform == "sagemaker" else {platform}
    return {p.region for i in catalog.instances().values() for p in i.prices if p.platform in wanted}


def check_region(region: str, platform: str = "ec2") -> None:
    """PlannerError unless `platform` is known and has prices in `region`."""
    known_platforms = platforms()
    if platform not in known_platforms:
        raise PlannerError(f"no prices for platform '{platform}'.{catalog.suggest(platform, sorted(known_platforms))} "
                           f"Known platforms: {', '.join(sorted(known_platforms))} (plugins add their own)")
    known = regions(platform)
    if region not in known:
        raise PlannerError(f"no {platform} prices for region '{region}'.{catalog.suggest(region, sorted(known))} "
                           f"Catalogued prices cover: {', '.join(sorted(known)) or 'none'}")


def default_region(platform: str) -> str:
    """us-east-1 where the platform has prices there (the bundled snapshot), else its only region."""
    known = regions(platform)
    if "us-east-1" in known or not known:
        return "us-east-1"
    if len(known) == 1:
        return next(iter(known))
    raise PlannerError(f"platform '{platform}' has prices in several regions ({', '.join(sorted(known))}); "
                       "choose one with --region")


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
            base = Price(usd_per_hour=known[instance.type], region=region, platform="sagemaker",
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
