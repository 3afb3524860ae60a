"""The catalogs shipped in `catalogs/`: models, GPUs, AWS instances and prices, loaded once."""

from __future__ import annotations

import difflib
import json
from datetime import date
from functools import cache
from importlib import resources
from typing import Any

from ftplan.errors import PlannerError
from pydantic import BaseModel


class CatalogModel(BaseModel):
    """A catalogued model: names it answers to, its config.json fields, licence and source."""

    name: str
    display_name: str
    hf_id: str
    aliases: list[str] = []
    license: str
    source: str
    notes: str = ""
    retrieved: str
    config: dict[str, Any]


class Gpu(BaseModel):
    """One GPU type: memory as the cloud reports it, dense peak throughput, capabilities."""

    name: str
    memory_bytes: int
    memory_gib_reported: float
    bf16_tflops: float | None
    fp16_tflops: float
    memory_bandwidth_gbps: float
    architecture: str
    supports_bf16: bool
    supports_flash_attention: bool
    source: str
    memory_source: str


class Price(BaseModel):
    """An hourly price with where and when it was read."""

    usd_per_hour: float
    region: str
    platform: str
    market: str
    date: str
    source: str


class Instance(BaseModel):
    """A cloud instance type and its GPUs."""

    type: str
    gpu: str
    gpu_count: int
    vcpus: int
    memory_gib: float
    network: str
    interconnect: str
    efa: bool
    prices: list[Price]
    notes: str = ""
    spec_source: str

    def price(self, region: str = "us-east-1", platform: str = "ec2", market: str = "on-demand") -> Price | None:
        return next((p for p in self.prices if (p.region, p.platform, p.market) == (region, platform, market)), None)


# Entries added by plugins (register_catalog_entries); the bundled catalog is never modified.
_ADDED: dict[str, list[Any]] = {"model": [], "gpu": [], "instance": []}


def add_entry(kind: str, entry: Any) -> None:
    """Add a plugin's model, GPU or instance; PlannerError if the name is taken or a reference is unknown."""
    if kind == "model":
        taken = find_model(entry.name) or find_model(entry.hf_id)
        if taken:
            raise PlannerError(f"model '{entry.name}' is already catalogued")
    elif kind == "gpu":
        if entry.name.lower() in gpus():
            raise PlannerError(f"GPU '{entry.name}' is already catalogued")
    elif entry.type in instances():
        raise PlannerError(f"instance type '{entry.type}' is already catalogued")
    elif entry.gpu.lower() not in gpus():
        raise PlannerError(f"instance type '{entry.type}' names unknown GPU '{entry.gpu}'; register the GPU first")
    _ADDED[kind].append(entry)
    _clear_caches()


def clear_added_entries() -> None:
    for entries in _ADDED.values():
        entries.clear()
    _clear_caches()


def clear_caches() -> None:
    """Forget loaded catalogs (after a price refresh or plugin changes)."""
    _clear_caches()


def _clear_caches() -> None:
    for f in (models, gpus, instances, _model_index):
        f.cache_clear()


def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("ftplan.catalogs").joinpath(name).read_text(encoding="utf-8"))


@cache
def models() -> tuple[CatalogModel, ...]:
    return tuple(CatalogModel(**m) for m in _load("models.json")["models"]) + tuple(_ADDED["model"])


@cache
def gpus() -> dict[str, Gpu]:
    bundled = {g["name"].lower(): Gpu(**g) for g in _load("gpus.json")["gpus"]}
    return bundled | {g.name.lower(): g for g in _ADDED["gpu"]}


@cache
def instances() -> dict[str, Instance]:
    bundled = {i["type"]: Instance(**i) for i in _load("aws_instances.json")["instances"]}
    merged = bundled | {i.type: i for i in _ADDED["instance"]}
    for cached in _refreshed_prices():  # `ftplan prices refresh` results come first: Instance.price finds them
        inst = merged.get(cached.instance_type)
        if inst is not None:  # a copy: plugin-added instances are shared and outlive this cache
            price = Price(**cached.model_dump(exclude={"instance_type"}))
            merged[inst.type] = inst.model_copy(update={"prices": [price, *inst.prices]})
    return merged


def _refreshed_prices():
    from ftplan.data.files import user_dir

    if not (user_dir() / "prices.json").exists():  # the usual case: skip the cache module's import
        return []
    from ftplan.data.aws_prices import (
        load_cache,  # pydantic only; boto3 is imported when refreshing, not here
    )

    return load_cache().prices


STALE_DAYS = 90


def stale_warning(price_date: str, today: date | None = None) -> str:
    """A warning for a price older than 90 days, '' otherwise (or for a date that is not ISO)."""
    try:
        days = ((today or date.today()) - date.fromisoformat(price_date)).days
    except ValueError:
        return ""
    if days > STALE_DAYS:
        return f"price dated {price_date} is {days} days old; refresh with: ftplan prices refresh"
    return ""


@cache
def peft_default_targets() -> dict[str, list[str]]:
    return _load("peft_default_targets.json")["defaults"]


@cache
def throughput() -> dict[str, Any]:
    """Utilisation defaults, dequantization and communication assumptions (catalogs/throughput.json)."""
    return _load("throughput.json")


@cache
def pricing() -> dict[str, Any]:
    """Spot discount, SageMaker rates and billing rules (catalogs/pricing.json)."""
    return _load("pricing.json")


@cache
def quality() -> dict[str, Any]:
    """Published evidence on each method's quality per task (catalogs/quality.json)."""
    return _load("quality.json")


@cache
def _model_index() -> dict[str, CatalogModel]:
    index: dict[str, CatalogModel] = {}
    for m in models():
        for key in (m.name, m.display_name, m.hf_id, *m.aliases):
            index[key.lower()] = m
    return index


def find_model(name: str) -> CatalogModel | None:
    """The catalogued model answering to a short name, display name, alias or HF id (any case)."""
    return _model_index().get(name.strip().lower())


def suggest(name: str, choices: list[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=n, cutoff=0.6)
    by_lower = {c.lower(): c for c in choices}
    return f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""


def model_suggestions(name: str) -> str:
    return suggest(name, [m.name for m in models()] + [m.hf_id for m in models()])


def get_gpu(name: str) -> Gpu:
    """The GPU called `name` (any case); PlannerError with suggestions otherwise."""
    gpu = gpus().get(name.strip().lower())
    if gpu is None:
        names = [g.name for g in gpus().values()]
        raise PlannerError(f"unknown GPU '{name}'.{suggest(name, names)} Known GPUs: {', '.join(names)}")
    return gpu


def get_instance(type_: str) -> Instance:
    """The instance type `type_`; PlannerError with suggestions otherwise."""
    inst = instances().get(type_.strip().lower())
    if inst is None:
        raise PlannerError(f"unknown instance type '{type_}'.{suggest(type_, list(instances()))} "
                           "List them with: ftplan instances")
    return inst


def gpu_of(instance: Instance) -> Gpu:
    return gpus()[instance.gpu.lower()]
