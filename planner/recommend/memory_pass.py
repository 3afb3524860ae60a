"""Stage 2 of the search: the memory pass. Memory does not depend on the instance, so each setting's
single-GPU breakdown is computed once per micro-batch - for a step of that micro-batch alone and for one that
accumulates gradients over several - stopping at the first micro-batch that no searched GPU could hold even
sharded over every GPU allowed (larger micro-batches only need more).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftplan.estimate.memory import MemoryBreakdown, estimate_memory
from ftplan.estimate.params import ParamCounts, count_params, fit_dropout, folds_parameters
from ftplan.estimate.settings import SetupChoices, TrainingSetup
from ftplan.estimate.sharding import shard
from ftplan.model.layout import ModelLayout
from ftplan.recommend import grid
from ftplan.recommend.models import SearchRequest


@dataclass
class Setting:
    """One searched training setting, with its single-GPU memory by micro-batch ({} when none fits): `memory`
    for a step of one micro-batch, `accumulating` for a step that accumulates gradients over several."""

    setup: TrainingSetup
    counts: ParamCounts
    targets: str
    target_modules: str | list[str] | None
    memory: dict[int, MemoryBreakdown] = field(default_factory=dict)
    accumulating: dict[int, MemoryBreakdown] = field(default_factory=dict)
    least_bytes: int = 0  # the least this setting needs per GPU, sharded over every GPU allowed

    def memory_at(self, micro: int, world: int, global_batch: int) -> MemoryBreakdown:
        """The step's memory at `micro` sequences per GPU on `world` GPUs: they accumulate gradients whenever
        they take fewer sequences than the global batch."""
        return self.accumulating[micro] if micro * world < global_batch else self.memory[micro]

    @property
    def all_linear(self) -> bool:
        return self.counts.targets is None or self.counts.targets.all_linear


def _targets_label(counts: ParamCounts) -> str:
    if counts.targets is None:
        return ""
    if counts.targets.all_linear:
        return "all-linear"
    return "peft-default" if counts.targets.source == "peft-default" else ",".join(counts.targets.names)


def memory_pass(layout: ModelLayout, request: SearchRequest, choices: SetupChoices, fixed: set[str],
                largest_gpu_bytes: int) -> list[Setting]:
    """Every setting of the grid with the micro-batches whose memory some searched GPU could hold."""
    settings: list[Setting] = []
    count_cache: dict[tuple, ParamCounts] = {}
    max_world = grid.largest_world(request.max_gpus)
    micros = grid.micro_batches(request)
    for setup in grid.setting_grid(choices, request.methods, fixed, layout.model_type):
        if setup.lora:
            setup = setup.model_copy(update={"lora": fit_dropout(layout, setup.lora)})
            if "targets" not in fixed and setup.lora.dropout > 0 and folds_parameters(layout, setup.lora):
                continue  # a dropout the user set rules out adapters PEFT builds without one
        key = (setup.method, tuple(setup.lora.targets or ()) if setup.lora else None)
        counts = count_cache.get(key) or count_cache.setdefault(key, count_params(layout, setup.method, setup.lora))
        st = Setting(setup, counts, _targets_label(counts), counts.targets.peft_value() if counts.targets else None)
        for micro in micros:
            micro_setup = setup.model_copy(update={"batch_size": micro})
            memory = estimate_memory(layout, micro_setup, counts)
            need = memory.required_bytes
            if need > largest_gpu_bytes and max_world > 1:  # the least it can need: sharded over every GPU
                need = min(need, shard(layout, micro_setup, memory, gpus=max_world, sharding="fsdp").required_bytes)
            if micro == micros[0]:
                st.least_bytes = need
            if need > largest_gpu_bytes:
                break
            st.memory[micro] = memory
            if micro < request.global_batch:
                st.accumulating[micro] = estimate_memory(layout, micro_setup, counts, accumulating=True)
        settings.append(st)
    return settings
