"""The catalogs shipped in `catalogs/`: models, GPUs, AWS instances and prices, loaded once."""

from __future__ import annotations

import difflib
import json
import re
from datetime import date
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from ftplan.data.price import Price
from ftplan.errors import PlannerError

if TYPE_CHECKING:
    from ftplan.data import planning_rules, rules


class ModelVariant(BaseModel):
    """An instruct or chat release with its base entry's architecture: every config field ftplan reads is the
    same (a release that differs in any is an entry of its own)."""

    name: str = Field(min_length=1, description="short name users type, e.g. llama2-7b-chat")
    hf_id: str = Field(min_length=1, description="its Hugging Face repository id")
    aliases: list[str] = Field([], description="other names it answers to (any case)")
    source: str = Field(description="where its config was read, showing the architecture is the base's")
    notes: str = Field("", description="fields that differ and why they do not matter (token ids...)")


class CatalogModel(BaseModel):
    """A catalogued model: the names it answers to, its config.json fields, licence and source."""

    name: str = Field(min_length=1, description="short name users type, e.g. llama2-7b")
    display_name: str = Field(description="the name as its authors write it, e.g. Llama-2-7B")
    hf_id: str = Field(min_length=1, description="Hugging Face repository id, e.g. meta-llama/Llama-2-7b-hf")
    aliases: list[str] = Field([], description="other names it answers to (any case)")
    license: str = Field(description="licence, and whether the Hub repository is gated")
    source: str = Field(description="where the config fields were read")
    notes: str = Field("", description="anything a user should know about this entry")
    retrieved: str = Field(description="when the config was read (ISO date or month)")
    config: dict[str, Any] = Field(description="config.json keys needed to rebuild the architecture exactly "
                                               "(model_type, sizes, tie_word_embeddings...)")
    variants: list[ModelVariant] = Field([], description="instruct/chat releases with this exact architecture")


# What a real GPU can be: a plugin's entry outside these bounds is a mistake, and would reach every figure
MIN_TFLOPS, MAX_TFLOPS = 0.1, 100_000.0


class Gpu(BaseModel):
    """One GPU type: memory as the driver reports it, dense peak throughput, capabilities."""

    name: str = Field(min_length=1, description="catalog name, e.g. A100-80GB")
    aliases: list[str] = Field([], description="other names it answers to, e.g. 'RTX 4090', 'GeForce RTX 4090'")
    memory_bytes: int = Field(ge=2**28, le=2**50, description="usable memory in bytes (what torch's total_memory or the cloud "
                                                "API reports), against which required bytes are compared")
    memory_gib_reported: float = Field(gt=0, le=2**20, allow_inf_nan=False, description="the same in GiB as shown to users")
    bf16_tflops: float | None = Field(ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False, description="dense bf16 tensor-core peak with "
                                                                             "fp32 accumulate, TFLOP/s; null without bf16")
    fp16_tflops: float = Field(ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False, description="dense fp16 tensor-core peak with fp32 "
                                                                      "accumulate, TFLOP/s")
    fp32_tflops: float | None = Field(None, ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False,
                                      description="dense fp32 peak on the CUDA cores, TFLOP/s: fp32 matmuls without "
                                                  "TF32 (null: taken as 1/16 of fp16, the A100's ratio)")
    tf32_tflops: float | None = Field(None, ge=MIN_TFLOPS, le=MAX_TFLOPS, allow_inf_nan=False,
                                      description="dense TF32 tensor-core peak, TFLOP/s: fp32 matmuls with TF32 on "
                                                  "(null: no TF32, as on Volta and Turing)")
    memory_bandwidth_gbps: float = Field(ge=1, le=10**6, allow_inf_nan=False, description="peak memory bandwidth, GB/s")
    architecture: str = Field(description="turing, volta, ampere, ada, hopper, blackwell... (utilisation defaults "
                                          "are per architecture)")
    supports_bf16: bool
    supports_flash_attention: bool = Field(description="FlashAttention-2 runs on it (Ampere or newer)")
    source: str = Field(description="where the throughput and bandwidth figures come from")
    fp32_source: str = Field("", description="where fp32_tflops and tf32_tflops come from")
    memory_source: str = Field(description="where the memory figure comes from")
    notes: str = Field("", description="caveats: memory that depends on the driver or ECC, provisional figures")
    retrieved: str = Field("", description="when the figures were read")


class Instance(BaseModel):
    """A rentable (or owned) machine type and its GPUs."""

    type: str = Field(min_length=1, description="instance type name, e.g. g5.2xlarge or onprem-a100x8")
    gpu: str = Field(description="catalogued GPU name (register the GPU first)")
    gpu_count: int = Field(gt=0, le=1024)
    vcpus: int = Field(gt=0, le=10**5)
    memory_gib: float = Field(gt=0, le=2**24, allow_inf_nan=False, description="host RAM in GiB (it must hold the checkpoint "
                                                                     "while loading)")
    network: str = Field(description="network performance as the provider states it, e.g. '100 Gb', 'up to 25 Gb'")
    interconnect: str = Field(description="between its GPUs: 'NVSwitch', 'NVLink', 'PCIe' (EFA noted here too)")
    efa: bool = Field(description="Elastic Fabric Adapter (or an equivalent RDMA network) between instances")
    prices: list[Price] = Field(description="hourly prices; the first matching region, platform and market wins")
    notes: str = ""
    spec_source: str = Field(description="where the specification comes from")

    def price(self, region: str = "us-east-1", platform: str = "ec2", market: str = "on-demand") -> Price | None:
        return next((p for p in self.prices if (p.region, p.platform, p.market) == (region, platform, market)), None)

    def home_price(self) -> Price | None:
        """The price to show when no region is asked for: EC2 on-demand in us-east-1 (the bundled prices),
        else the instance's first on-demand price, in its own region and platform (plugins' hardware)."""
        return self.price() or next((p for p in self.prices if p.market == "on-demand"), None)

    def priced(self, region: str | None) -> Price | None:
        """The on-demand price in `region` (on whichever platform prices it there: EC2 first), or the home
        price when `region` is None."""
        if region is None:
            return self.home_price()
        return self.price(region) or next((p for p in self.prices if p.region == region and p.market == "on-demand"),
                                          None)


# Entries added by plugins (register_catalog_entries); the bundled catalog is never modified.
_ADDED: dict[str, list[Any]] = {"model": [], "gpu": [], "instance": []}


def add_entry(kind: str, entry: Any) -> None:
    """Add a plugin's model, GPU or instance; PlannerError if the name is taken or a reference is unknown."""
    if kind == "model":
        taken = find_model(entry.name) or find_model(entry.hf_id)
        if taken:
            raise PlannerError(f"model '{entry.name}' is already catalogued")
    elif kind == "gpu":
        # its name must be new; an alias already taken is kept but never shadows the bundled GPU (_gpu_index)
        if find_gpu(entry.name):
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
    for f in (models, gpus, instances, _model_index, _gpu_index):
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
    from ftplan.data.price_cache import load_cache  # pydantic only

    return load_cache().prices


def stale_warning(price_date: str, today: date | None = None) -> str:
    """A warning for a price older than pricing.json's stale_after_days, '' otherwise (or for a date that is
    not ISO)."""
    try:
        days = ((today or date.today()) - date.fromisoformat(price_date)).days
    except ValueError:
        return ""
    if days > pricing().stale_after_days:
        return f"price dated {price_date} is {days} days old; refresh with: ftplan prices refresh"
    return ""


@cache
def memory_validation() -> rules.MemoryValidation:
    """The memory model against published GPU runs (catalogs/memory_validation.json, by
    benchmarks/memory_published.py)."""
    from ftplan.data import rules  # its classes are built only when a rule is needed

    return rules.MemoryValidation.model_validate(_load("memory_validation.json"))


@cache
def peft_default_targets() -> dict[str, list[str]]:
    """PEFT's default LoRA targets per model type (catalogs/peft_default_targets.json)."""
    from ftplan.data import rules  # its classes are built only when a rule is needed

    return rules.PeftDefaults.model_validate(_load("peft_default_targets.json")).defaults


@cache
def throughput() -> planning_rules.Throughput:
    """Utilisation defaults, dequantization and communication assumptions (catalogs/throughput.json)."""
    from ftplan.data import planning_rules  # its classes are built only when recommend needs them

    return planning_rules.Throughput.model_validate(_load("throughput.json"))


@cache
def time_validation() -> planning_rules.TimeValidation:
    """The time model against published runs (catalogs/time_validation.json, by benchmarks/time_accuracy.py)."""
    from ftplan.data import planning_rules  # its classes are built only when recommend needs them

    return planning_rules.TimeValidation.model_validate(_load("time_validation.json"))


@cache
def pricing() -> rules.Pricing:
    """Spot discount, SageMaker rates and images, billing rules (catalogs/pricing.json)."""
    from ftplan.data import rules  # its classes are built only when a rule is needed

    return rules.Pricing.model_validate(_load("pricing.json"))


@cache
def sagemaker_images():
    """The Hugging Face training images for SageMaker, with their registries (catalogs/sagemaker_images.json)."""
    from ftplan.data import cloud_rules

    return cloud_rules.TrainingImages.model_validate(_load("sagemaker_images.json"))


@cache
def ec2_quotas():
    """EC2 vCPU quota codes per instance family (catalogs/ec2_quotas.json)."""
    from ftplan.data import cloud_rules

    return cloud_rules.Ec2Quotas.model_validate(_load("ec2_quotas.json"))


@cache
def quality() -> planning_rules.Quality:
    """Published evidence on each method's quality per task (catalogs/quality.json)."""
    from ftplan.data import planning_rules  # its classes are built only when recommend needs them

    return planning_rules.Quality.model_validate(_load("quality.json"))


@cache
def memory_rules() -> rules.MemoryRules:
    """CUDA context and allocator slack (catalogs/memory.json)."""
    from ftplan.data import rules  # its classes are built only when a rule is needed

    return rules.MemoryRules.model_validate(_load("memory.json"))


@cache
def planning() -> planning_rules.Planning:
    """recommend's search grid and the dataset approximation (catalogs/planning.json)."""
    from ftplan.data import planning_rules  # its classes are built only when recommend needs them

    return planning_rules.Planning.model_validate(_load("planning.json"))


@cache
def _model_index() -> dict[str, tuple[CatalogModel, ModelVariant | None]]:
    index: dict[str, tuple[CatalogModel, ModelVariant | None]] = {}
    for m in models():
        for key in (m.name, m.display_name, m.hf_id, *m.aliases):
            index[key.lower()] = (m, None)
        for v in m.variants:
            for key in (v.name, v.hf_id, *v.aliases):
                index[key.lower()] = (m, v)
    for m in models():  # the repository name alone ('Llama-2-7b-chat-hf'), where no other entry uses it
        for key, variant in ((m.hf_id, None), *((v.hf_id, v) for v in m.variants)):
            index.setdefault(key.rsplit("/", 1)[-1].lower(), (m, variant))
    return index


def find_model(name: str) -> CatalogModel | None:
    """The catalogued model answering to a short name, display name, alias or HF id (any case); for a
    variant's name, the base entry whose architecture it shares."""
    found = _model_index().get(name.strip().lower())
    return found[0] if found else None


def find_variant(name: str) -> tuple[CatalogModel, ModelVariant | None] | None:
    """The catalogued model answering to `name`, and the instruct/chat variant it names (None: the entry)."""
    return _model_index().get(name.strip().lower())


def suggest(name: str, choices: list[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest choices, or '' when nothing is close."""
    close = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=n, cutoff=0.6)
    by_lower = {c.lower(): c for c in choices}
    return f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""


def model_suggestions(name: str) -> str:
    """' Did you mean: ...?' for a model name, among the entries' and their variants' names and Hub ids."""
    return suggest(name, [n for m in models() for n in (m.name, m.hf_id, *(x for v in m.variants
                                                                           for x in (v.name, v.hf_id)))])


def gpu_key(name: str) -> str:
    """How GPU names are compared: any case, spaces, dashes and underscores ignored ('RTX 4090' = 'rtx-4090')."""
    return re.sub(r"[\s\-_]+", "", name).lower()


@cache
def _gpu_index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in gpus().values():  # bundled first: a plugin's alias never shadows a bundled name
        for key in (gpu.name, *gpu.aliases):
            index.setdefault(gpu_key(key), gpu)
    return index


def find_gpu(name: str) -> Gpu | None:
    """The GPU answering to `name` or one of its aliases ('RTX 4090', 'GeForce RTX 4090', 'rtx4090'), or None."""
    return _gpu_index().get(gpu_key(name))


def get_gpu(name: str) -> Gpu:
    """The GPU called `name` or one of its aliases (any case, spaces and dashes ignored); PlannerError with
    suggestions otherwise."""
    gpu = find_gpu(name)
    if gpu is None:
        names = [g.name for g in gpus().values()]
        raise PlannerError(f"unknown GPU '{name}'.{suggest(name, names)} Known GPUs: {', '.join(names)}; ftplan "
                           "estimate --gpu-memory 24GiB judges any other GPU by its memory")
    return gpu


def get_instance(type_: str) -> Instance:
    """The instance type `type_`; PlannerError with suggestions otherwise."""
    inst = instances().get(type_.strip().lower().removeprefix("ml."))  # SageMaker's names for EC2's types
    if inst is None:
        raise PlannerError(f"unknown instance type '{type_}'.{suggest(type_, list(instances()))} "
                           "List them with: ftplan instances")
    return inst


def gpu_of(instance: Instance) -> Gpu:
    return gpus()[instance.gpu.lower()]
