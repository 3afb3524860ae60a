"""The memory model against peak memory that published GPU runs measured (catalogs/memory_validation.json,
written by benchmarks/memory_published.py): evidence shown beside an estimate, not a correction of it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ftplan.data import catalog


class PublishedMemoryCheck(BaseModel):
    """How the peak memory of published GPU runs of the same method and sharding compared with this model's
    estimate of it (catalogs/memory_validation.json): evidence beside the figure, not a correction of it."""

    runs: int
    measured_over_estimated: tuple[float, float] = Field(description="least and greatest torch.cuda."
                                                                     "max_memory_allocated / ftplan's peak allocated")
    sources: list[str]
    models: list[str]
    validated: str = Field(description="date of catalogs/memory_validation.json")


def published_check(method: str, sharding: str, device: str) -> PublishedMemoryCheck | None:
    """The published GPU runs of `method` under `sharding` ('none': one GPU) against the memory model; None on the
    CPU, or where no such run was published."""
    if device != "cuda":
        return None
    validation = catalog.memory_validation()
    group = next((g for g in validation.groups if (g.method, g.sharding) == (method, sharding)), None)
    if group is None:
        return None
    return PublishedMemoryCheck(runs=group.runs, measured_over_estimated=group.measured_over_estimated,
                                sources=group.sources, models=group.models, validated=validation.date)
