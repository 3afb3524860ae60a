"""Refreshed prices cached per user in $FTPLAN_HOME/prices.json (written by `ftplan prices refresh`).

pydantic only: the catalog reads the cache on every command that prices instances, without boto3.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from ftplan.data.files import atomic_write_text, read_user_file, user_dir
from ftplan.data.price import Price


class CachedPrice(Price):
    """One refreshed hourly rate, for an instance type."""

    instance_type: str


class PriceCache(BaseModel):
    """$FTPLAN_HOME/prices.json."""

    schema_version: int = 1
    prices: list[CachedPrice] = []


def cache_path() -> Path:
    return user_dir() / "prices.json"


def load_cache(path: Path | None = None) -> PriceCache:
    """The refreshed prices, or an empty cache; a corrupt cache is named with the fix."""
    return read_user_file(path or cache_path(), PriceCache, "price cache",
                          "delete it or run ftplan prices refresh again")


def save_cache(new: list[CachedPrice], path: Path | None = None) -> Path:
    """Merge `new` into the cache (replacing the same type, region, platform and market); atomic."""
    path = path or cache_path()
    key = lambda p: (p.instance_type, p.region, p.platform, p.market)  # noqa: E731
    merged = {key(p): p for p in load_cache(path).prices}
    merged.update({key(p): p for p in new})
    atomic_write_text(path, PriceCache(prices=sorted(merged.values(), key=key)).model_dump_json(indent=1))
    return path
