"""The memory model against peak memory that published GPU runs measured (catalogs/memory_validation.json,
written by benchmarks/memory_published.py): evidence shown beside an estimate, not a correction of it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ftplan.data import catalog


class PublishedMemoryCheck(BaseModel):
    """How the peak memory of published GPU runs of the same method and sharding compared with this model's
    estimate of it (catalogs/memory_validation.json): evidence beside the figure, not a correction of it."""

    sharding: str = Field(description="the published runs': 'none' for one GPU (what a DDP replica also holds), "
                                      "else as ftplan names it")
    runs: int
    measured_over_estimated: tuple[float, float] = Field(description="least and greatest torch.cuda."
                                                                     "max_memory_allocated / ftplan's peak allocated")
    sources: list[str]
    models: list[str]
    validated: str = Field(description="date of catalogs/memory_validation.json")


def published_check(method: str, sharding: str, device: str, *, gpus: int = 1,
                    offload: str = "none") -> PublishedMemoryCheck | None:
    """The published GPU runs of `method` under `sharding` over `gpus` GPUs against the memory model; None on the
    CPU, with offloading (no published run offloaded), or where no such run was published. A DDP replica and
    sharding over one GPU hold what one GPU holds, so they take the one-GPU runs."""
    if device != "cuda" or offload != "none":
        return None
    key = "none" if sharding == "ddp" or gpus == 1 else sharding
    validation = catalog.memory_validation()
    group = next((g for g in validation.groups if (g.method, g.sharding) == (method, key)), None)
    if group is None:
        return None
    return PublishedMemoryCheck(**group.model_dump(exclude={"method"}), validated=validation.date)


def required_at(ratio: float, peak_allocated: int, required: int) -> int:
    """GPU memory a plan needs if its allocated peak is `ratio` x the estimate: the extra peak with its allocator
    slack on top of `required` (the context and paged states do not scale)."""
    slack = catalog.memory_rules().allocator_slack
    return required + round(peak_allocated * (ratio - 1) * (1 + slack))
