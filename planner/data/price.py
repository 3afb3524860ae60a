"""The one price model: an hourly rate with where and when it was read. The catalog's prices, the refreshed
price cache and the price a plan is costed at all extend it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ftplan.names import Name

MAX_USD_PER_HOUR = 100_000.0  # the dearest cloud instance costs about $100/h: far beyond is a typo or an attack


class Price(BaseModel):
    """An hourly price with where and when it was read."""

    usd_per_hour: float = Field(gt=0, le=MAX_USD_PER_HOUR, allow_inf_nan=False, description="dollars per "
                                                                                            "instance-hour")
    region: str = Field(min_length=1, description="region code (us-east-1), or a plugin's own (dc1, europe-west4)")
    platform: Name = Field(description="ec2, sagemaker, or a plugin's own platform name (gcp, onprem)")
    market: Literal["on-demand", "spot"]
    date: str = Field(description="when the price was read (ISO date)")
    source: str = Field(description="where the price was read")
