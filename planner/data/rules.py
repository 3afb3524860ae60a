"""Typed models of the catalogued rules the estimate path reads: memory overheads, PEFT's default targets,
pricing. (Throughput, quality and the search grid, which only recommend needs, are in planning_rules.py:
every model class costs start-up time.)

Every figure the core uses that is not a fact of a library or an API lives in catalogs/*.json with
its source; these models are how the code reads them (loaded once by ftplan.data.catalog).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Rules(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- pricing.json ---------------------------------------------------------------------------------
class Spot(_Rules):
    default_discount: float = Field(ge=0, lt=1)
    source: str
    caveat: str


class KnownRate(_Rules):
    type: str
    usd_per_hour: float = Field(gt=0)


class SageMakerRules(_Rules):
    uplift_over_ec2: float = Field(gt=0)
    source: str
    known: list[KnownRate]
    known_source: str
    known_date: str
    training_instance_types: list[str]
    training_instance_types_source: str


class Billing(_Rules):
    minimum_seconds: float = Field(ge=0)
    source: str


class Pricing(_Rules):
    """catalogs/pricing.json."""

    schema_: int = Field(alias="schema")
    spot: Spot
    sagemaker: SageMakerRules
    billing: dict[str, Billing]
    stale_after_days: int = Field(gt=0)
    stale_source: str

    def minimum_seconds(self, platform: str) -> float:
        """The platform's minimum billed time (0 for platforms with no catalogued rule)."""
        rule = self.billing.get(platform)
        return rule.minimum_seconds if rule else 0.0


# -- memory.json ----------------------------------------------------------------------------------
class MemoryRules(_Rules):
    """catalogs/memory.json: what a GPU needs beyond the allocator's peak."""

    schema_: int = Field(alias="schema")
    cuda_context_bytes: int = Field(ge=0)
    cuda_context_source: str
    allocator_slack: float = Field(ge=0, lt=1)
    allocator_slack_source: str


# -- memory_validation.json -----------------------------------------------------------------------
class PublishedMemoryGroup(_Rules):
    """Published GPU runs of one method and sharding against the memory model."""

    method: str
    sharding: str = Field(description="'none' for one GPU, else as ftplan names it (fsdp, zero3, ...)")
    runs: int = Field(ge=1)
    measured_over_estimated: tuple[float, float] = Field(description="least and greatest torch.cuda."
                                                                     "max_memory_allocated / ftplan's peak allocated")
    sources: list[str]
    models: list[str]


class MemoryValidation(_Rules):
    """catalogs/memory_validation.json, written by benchmarks/memory_published.py."""

    schema_: int = Field(alias="schema")
    date: str
    about: str
    source: str
    groups: list[PublishedMemoryGroup]


class PeftDefaults(_Rules):
    """catalogs/peft_default_targets.json."""

    schema_: int = Field(alias="schema")
    source: str
    note: str
    defaults: dict[str, list[str]]
