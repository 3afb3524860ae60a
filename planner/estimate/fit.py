"""Which GPUs and instances hold a training step, and what they cost per hour."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate.settings import TrainingSetup


class InstanceFit(BaseModel):
    """One instance type (or one GPU on its own) judged against a per-GPU memory requirement."""

    instance_type: str | None = Field(description="null: a GPU judged on its own, unpriced (--gpu for a GPU no "
                                                  "catalogued instance has, or --gpu-memory)")
    gpu: str
    gpu_count: int
    gpu_memory_bytes: int
    required_bytes: int
    headroom_bytes: int  # negative: short by that much
    fits: bool
    usd_per_hour: float | None
    price_date: str | None
    price_source: str | None
    reason: str = ""


def gpu_supports(gpu: catalog.Gpu, setup: TrainingSetup) -> str:
    """'' if the GPU can run `setup`, else why not."""
    if setup.attention == "flash_attention_2" and not gpu.supports_flash_attention:
        return f"{gpu.name} has no FlashAttention-2 support (needs Ampere or newer)"
    if setup.precision.startswith("bf16") and not gpu.supports_bf16:
        return f"{gpu.name} has no bf16"
    return ""


def judge(instance: catalog.Instance, required_bytes: int, setup: TrainingSetup,
          region: str | None = None) -> InstanceFit:
    """How `instance`'s GPUs compare with `required_bytes` per GPU, priced in `region` (None: each instance's
    own region - us-east-1 for the bundled catalog, the plugin's for its hardware)."""
    gpu = catalog.gpu_of(instance)
    price = instance.priced(region)
    reason = gpu_supports(gpu, setup)
    headroom = gpu.memory_bytes - required_bytes
    return InstanceFit(
        instance_type=instance.type, gpu=gpu.name, gpu_count=instance.gpu_count, gpu_memory_bytes=gpu.memory_bytes,
        required_bytes=required_bytes, headroom_bytes=headroom, fits=headroom >= 0 and not reason,
        usd_per_hour=price.usd_per_hour if price else None, price_date=price.date if price else None,
        price_source=price.source if price else None, reason=reason,
    )


def hypothetical_gpu_name(memory_bytes: int) -> str:
    """How a GPU known only by its memory (--gpu-memory) is named."""
    return f"{memory_bytes / 2**30:,.4g} GiB GPU"


def judge_gpu(gpu: catalog.Gpu | None, required_bytes: int, setup: TrainingSetup, *,
              memory_bytes: int | None = None) -> InstanceFit:
    """One GPU against `required_bytes`, unpriced: a catalogued GPU, or (gpu None) a hypothetical one of
    `memory_bytes`, assumed to run bf16 and FlashAttention-2."""
    memory = gpu.memory_bytes if gpu else memory_bytes
    if memory is None:
        raise ValueError("judge_gpu needs a GPU or its memory")
    reason = gpu_supports(gpu, setup) if gpu else ""
    return InstanceFit(instance_type=None, gpu=gpu.name if gpu else hypothetical_gpu_name(memory), gpu_count=1,
                       gpu_memory_bytes=memory, required_bytes=required_bytes, headroom_bytes=memory - required_bytes,
                       fits=memory >= required_bytes and not reason, usd_per_hour=None, price_date=None,
                       price_source=None, reason=reason)


def cheapest_fits(required_bytes: int, setup: TrainingSetup, *, gpu: str | None = None, limit: int = 3,
                  region: str | None = None, min_gpus: int = 1) -> list[InstanceFit]:
    """The cheapest priced instances with at least `min_gpus` GPUs, each holding `required_bytes`."""
    fits = [judge(i, required_bytes, setup, region) for i in catalog.instances().values()
            if (gpu is None or i.gpu.lower() == gpu.lower()) and i.gpu_count >= min_gpus]
    priced = [f for f in fits if f.fits and f.usd_per_hour is not None]
    return sorted(priced, key=lambda f: (f.usd_per_hour, f.instance_type))[:limit]
