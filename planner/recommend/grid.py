"""Stage 1 of the search: what is searched - training settings, micro-batches, instance types and counts.

A setting the user pinned (optimizer, checkpointing, LoRA targets, micro-batch) is searched only at that
value; the grid itself (micro-batches and instance counts) comes from catalogs/planning.json.
"""

from __future__ import annotations

import math

from ftplan.data import catalog
from ftplan.estimate.settings import Method, SetupChoices, TrainingSetup, resolve
from ftplan.recommend.models import SearchRequest


def setting_grid(choices: SetupChoices, methods: list[Method], fixed: set[str], model_type: str) -> list[TrainingSetup]:
    """Every setting to evaluate: per method, optimizers (full: AdamW and 8-bit AdamW) x checkpointing x
    LoRA targets (PEFT's default and all-linear), each only where the user did not pin it."""
    grid = []
    for method in methods:
        base = resolve(method, choices, model_type=model_type)
        optimizers = [base.optimizer] if "optimizer" in fixed or method != "full" else ["adamw_torch_fused", "adamw_bnb_8bit"]
        ckpts = [base.grad_ckpt] if "grad_ckpt" in fixed else [False, True]
        target_sets = [choices.lora.targets] if method == "full" or "targets" in fixed else [None, ["all-linear"]]
        for opt in optimizers:
            for ckpt in ckpts:
                for targets in target_sets:
                    lora = choices.lora.model_copy(update={"targets": targets}) if method != "full" else None
                    grid.append(base.model_copy(update={"optimizer": opt, "grad_ckpt": ckpt, "lora": lora}))
    return grid


def micro_batches(request: SearchRequest) -> tuple[int, ...]:
    """Micro-batches to try, smallest first: the pinned one, or the grid's up to the global batch."""
    if request.micro_batch:
        return (request.micro_batch,)
    return tuple(b for b in catalog.planning().search.micro_batches if b <= request.global_batch)


def instances(request: SearchRequest) -> list[catalog.Instance]:
    """The instance types searched: --instances, or the whole catalog (plugins' entries included)."""
    if request.instances:
        return [catalog.get_instance(t) for t in request.instances]
    return list(catalog.instances().values())


def instance_counts(instance: catalog.Instance, max_gpus: int) -> list[int]:
    """Instance counts from the grid whose GPUs stay within --max-gpus (empty when even one has too many)."""
    return [n for n in catalog.planning().search.instance_counts if n * instance.gpu_count <= max_gpus]


def largest_world(max_gpus: int) -> int:
    """The most GPUs a plan can spread over: the largest power of two within --max-gpus (global batches
    usually are powers of two)."""
    return 2 ** int(math.log2(max_gpus))
