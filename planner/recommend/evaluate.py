"""Stage 3 of the search: every setting on every instance type and count - fit, host RAM, time, cost.

Each (setting, instance type, instance count) combination ends exactly one way: a candidate, or dropped
with one reason code, so the counts the output shows add up to what was evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ftplan.data import calibration, catalog
from ftplan.data.dataset import TokenBudget
from ftplan.estimate.compute import flops_per_token
from ftplan.estimate.cost import HourlyPrice, cost_usd, hourly_price
from ftplan.estimate.fit import gpu_supports
from ftplan.estimate.settings import TrainingSetup, for_gpu
from ftplan.estimate.sharding import loading_bytes_per_node, shard
from ftplan.estimate.timing import Parallel, StepTime, restated_u_max, step_time
from ftplan.model.layout import ModelLayout
from ftplan.model.spec import ModelSpec
from ftplan.recommend import grid
from ftplan.recommend.memory_pass import Setting
from ftplan.recommend.models import Candidate, SearchRequest

GIB = 2**30
# why a combination was dropped (the render layer words them)
NO_FIT_ANY_GPU = "no_fit_any_gpu"
TOO_MANY_GPUS = "instance_over_max_gpus"
NOT_ON_PLATFORM = "not_offered_on_platform"
NO_PRICE = "no_price"
NO_FIT_GPU = "no_fit_this_gpu"
NO_FIT_SHARDED = "no_fit_even_sharded"
NOT_DIVISIBLE = "global_batch_not_divisible"
HOST_RAM = "host_ram_below_checkpoint"
OVER_BUDGET = "over_budget"
OVER_DEADLINE = "over_deadline"
GPU_LACKS = "gpu_lacks_"  # + bf16 / flash_attention
DROPPED = {  # each code's meaning, for error lines and the render layer
    "no_fit_any_gpu": "does not fit any GPU searched",
    "instance_over_max_gpus": "instance has more GPUs than --max-gpus",
    "not_offered_on_platform": "not offered by the platform for training",
    "no_price": "no price on the platform in the region",
    "no_fit_this_gpu": "does not fit this GPU",
    "no_fit_even_sharded": "does not fit this GPU, even sharded",
    "global_batch_not_divisible": "global batch not divisible across the GPUs",
    "host_ram_below_checkpoint": "not enough host RAM to load the checkpoint",
    "over_budget": "over budget",
    "over_deadline": "over deadline",
    "gpu_lacks_bf16": "the GPU has no bf16",
    "gpu_lacks_flash_attention": "the GPU has no FlashAttention-2",
}


def describe_drop(code: str) -> str:
    return DROPPED.get(code, code.replace("_", " "))


@dataclass
class Outcome:
    """Every combination's fate, and per method what stopped it."""

    feasible: list[Candidate] = field(default_factory=list)
    over_budget: list[Candidate] = field(default_factory=list)
    over_deadline: list[Candidate] = field(default_factory=list)
    evaluated: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, dict[str, int]] = field(default_factory=dict)
    # method -> (GPUs, instance type, GPU) of the smallest instance that would hold it but has more GPUs than
    # --max-gpus allows
    wider: dict[str, tuple[int, str, str]] = field(default_factory=dict)

    def count(self, n: int) -> None:
        self.evaluated += n

    def drop(self, method: str, code: str, n: int = 1) -> None:
        self.rejections[code] = self.rejections.get(code, 0) + n
        per = self.by_method.setdefault(method, {})
        per[code] = per.get(code, 0) + n


@dataclass
class _Context:
    spec: ModelSpec
    layout: ModelLayout
    data: TokenBudget
    request: SearchRequest
    optimizer_steps: int
    calibrations: calibration.CalibrationFile
    total_params: int
    caches: dict = field(default_factory=lambda: {"time": {}, "shard": {}, "setup": {}, "tokens": {}})


def evaluate(spec: ModelSpec, layout: ModelLayout, data: TokenBudget, request: SearchRequest,
             settings: list[Setting], instances: list[catalog.Instance]) -> Outcome:
    """Every candidate of `settings` x `instances` x instance counts, sorted into feasible, over budget,
    over deadline, or dropped with a reason."""
    steps = math.ceil(math.ceil(data.sequences() / request.global_batch) * request.epochs)
    ctx = _Context(spec, layout, data, request, steps, calibration.load(), layout.total_params())
    out = Outcome()
    offered = set(catalog.pricing().sagemaker.training_instance_types)
    for inst in instances:
        counts = grid.instance_counts(inst, request.max_gpus)
        price = hourly_price(inst, request.region, request.platform, request.market, request.spot_discount)
        for st in settings:
            n = max(1, len(counts))
            out.count(n)
            if not st.memory:
                out.drop(st.setup.method, NO_FIT_ANY_GPU, n)
            elif request.platform == "sagemaker" and inst.type not in offered:
                out.drop(st.setup.method, NOT_ON_PLATFORM, n)
            elif price is None:
                out.drop(st.setup.method, NO_PRICE, n)
            elif not counts:
                out.drop(st.setup.method, TOO_MANY_GPUS, n)
                _note_wider(out, ctx, st, inst)
            else:
                _evaluate_setting(out, ctx, st, inst, counts, price)
    return out


def _note_wider(out: Outcome, ctx: _Context, st: Setting, inst: catalog.Instance) -> None:
    """Remember the smallest instance that would hold `st` if --max-gpus allowed its GPUs (for why-not)."""
    gpu = catalog.gpu_of(inst)
    if _fit(ctx, st, st.setup, gpu.memory_bytes, inst.gpu_count, 1)[1]:
        method = st.setup.method
        known = out.wider.get(method)
        if known is None or inst.gpu_count < known[0]:
            out.wider[method] = (inst.gpu_count, inst.type, gpu.name)


def _evaluate_setting(out: Outcome, ctx: _Context, st: Setting, inst: catalog.Instance, counts: list[int],
                      price: HourlyPrice) -> None:
    gpu = catalog.gpu_of(inst)
    method = st.setup.method
    setup = st.setup
    precision = for_gpu(setup.precision, gpu.supports_bf16)
    if precision != setup.precision:  # same bytes: bf16 becomes fp16 on GPUs without bf16
        setup = setup.model_copy(update={"precision": precision})
    if reason := gpu_supports(gpu, setup):
        out.drop(method, GPU_LACKS + ("flash_attention" if "FlashAttention" in reason else "bf16"), len(counts))
        return
    for count in counts:
        world = count * inst.gpu_count
        scheme, needs = _fit(ctx, st, setup, gpu.memory_bytes, world, count)
        micros = [m for m in needs if ctx.request.global_batch % (m * world) == 0]
        if not needs:
            out.drop(method, NO_FIT_GPU if scheme is None else NO_FIT_SHARDED)
        elif not micros:
            out.drop(method, NOT_DIVISIBLE)
        elif loading_bytes_per_node(st.memory[max(micros)].weights_bytes, scheme, inst.gpu_count) > \
                inst.memory_gib * GIB:
            out.drop(method, HOST_RAM)
        else:
            cand = _candidate(ctx, st, setup, inst, gpu, count, scheme, max(micros), needs[max(micros)], price)
            _file(out, ctx.request, cand)


def _file(out: Outcome, request: SearchRequest, cand: Candidate) -> None:
    if request.budget_usd is not None and cand.cost_usd > request.budget_usd:
        out.drop(cand.method, OVER_BUDGET)
        out.over_budget.append(cand)
    elif request.deadline_hours is not None and cand.hours > request.deadline_hours:
        out.drop(cand.method, OVER_DEADLINE)
        out.over_deadline.append(cand)
    else:
        out.feasible.append(cand)


def plan_setup(setup: TrainingSetup, micro: int, scheme: str) -> TrainingSetup:
    """The setup a candidate trains with: `micro` sequences per GPU, and under FSDP sync_each_batch - gradients
    reduce-scattered every micro-batch, the lean choice (the Trainer's no_sync would hold every gradient unsharded
    on every GPU), set at any accumulation since a run on fewer processes than the plan's GPUs accumulates more
    (plugins/hf/loop.accumulation)."""
    return setup.model_copy(update={"batch_size": micro, "sync_each_batch": scheme == "fsdp"})


def _fit(ctx: _Context, st: Setting, setup: TrainingSetup, gpu_bytes: int, world: int,
         count: int) -> tuple[str | None, dict[int, tuple[int, int]]]:
    """How `st` runs on `world` GPUs of `gpu_bytes` each: a whole replica per GPU (none/ddp) when one fits,
    else FSDP over all of them; and the micro-batches that fit, with (required, peak) bytes per GPU."""
    batch = ctx.request.global_batch
    replica = {m: (mem.required_bytes, mem.peak_allocated_bytes) for m in st.memory
               if (mem := st.memory_at(m, world, batch)).required_bytes <= gpu_bytes}
    if replica:
        return ("none" if world == 1 else "ddp"), replica
    if world == 1:
        return None, {}
    for m in sorted(st.memory, reverse=True):  # the largest micro-batch that fits sharded; larger ones need more
        if batch % (m * world):
            continue
        key = (id(st), m, world, count)
        cache = ctx.caches["shard"]
        # shard() re-estimates the step as the gathered weights run it: it needs this micro-batch's setup
        sharded = cache.get(key) or cache.setdefault(key, shard(
            ctx.layout, plan_setup(setup, m, "fsdp"), st.memory_at(m, world, batch), gpus=world, nodes=count,
            sharding="fsdp"))
        if sharded.required_bytes <= gpu_bytes:
            return "fsdp", {m: (sharded.required_bytes, sharded.peak_allocated_bytes)}
    return "fsdp", {}


def _candidate(ctx: _Context, st: Setting, setup: TrainingSetup, inst: catalog.Instance, gpu: catalog.Gpu,
               count: int, scheme: str, micro: int, need: tuple[int, int], price: HourlyPrice) -> Candidate:
    request, world = ctx.request, count * inst.gpu_count
    accum = request.global_batch // (micro * world)
    skey = (id(st), micro, setup.precision, scheme == "fsdp")
    micro_setup = ctx.caches["setup"].get(skey) or ctx.caches["setup"].setdefault(
        skey, plan_setup(setup, micro, scheme))
    timing = _timing(ctx, st, micro_setup, gpu, micro, accum, Parallel(instance=inst, count=count, sharding=scheme))
    train = ctx.optimizer_steps * timing.seconds
    tokens_per_second = world * timing.tokens_per_micro_batch * accum / timing.seconds
    overhead = catalog.throughput().overhead
    setup_seconds = overhead.setup_seconds + (overhead.cluster_launch_seconds if count > 1 else 0)
    total = train + setup_seconds
    basis, tier = catalog.quality().tier(request.task, setup.method, st.all_linear)
    # model_construct: every field comes from validated objects, and this loop is the hot path
    return Candidate.model_construct(
        method=setup.method, setup=micro_setup, targets=st.targets, target_modules=st.target_modules,
        instance_type=inst.type, instance_count=count, gpu=gpu.name, gpus_total=world, sharding=scheme,
        grad_accum=accum, required_bytes=need[0], peak_allocated_bytes=need[1], gpu_memory_bytes=gpu.memory_bytes,
        hours=total / 3600, train_hours=train / 3600, setup_hours=setup_seconds / 3600,
        cost_usd=cost_usd(total, price, count), price=price,
        tokens_per_second=tokens_per_second,
        data_tokens_per_second=tokens_per_second * ctx.data.tokens / _processed(ctx, micro),
        utilization=timing.utilization, utilization_source=timing.u_max_source, time=timing,
        optimizer_steps=ctx.optimizer_steps,
        quality_tier=tier.tier, quality_basis=basis, quality_evidence=tier.evidence)


def _timing(ctx: _Context, st: Setting, setup: TrainingSetup, gpu: catalog.Gpu, micro: int, accum: int,
            parallel: Parallel) -> StepTime:
    per_seq = _processed(ctx, micro) / ctx.data.sequences()
    key = (id(st), micro, setup.precision)
    flops = ctx.caches["time"].get(key) or ctx.caches["time"].setdefault(
        key, flops_per_token(ctx.layout, setup, st.counts, per_seq))
    calib = ctx.calibrations.find(gpu.name, ctx.spec.name, setup.method)
    u_max = (calib.ceiling(), f"calibrated by {calib.source} on {calib.date}") if calib else None
    memory = st.memory_at(micro, parallel.gpus, ctx.request.global_batch)
    step = step_time(ctx.layout, setup, st.counts, gpu, memory, tokens_per_sequence=per_seq,
                     accum=accum, parallel=parallel, u_max=u_max, flops=flops)
    if calib and calib.u_max:  # solved under older constants: the same step time under today's
        rebased = restated_u_max(step, calib, setup.attention, gpu.architecture)
        if rebased != step.u_max:
            step = step_time(ctx.layout, setup, st.counts, gpu, memory, tokens_per_sequence=per_seq, accum=accum,
                             parallel=parallel, u_max=(rebased, f"{u_max[1]}, restated for today's time "
                                                                "model"), flops=flops)
    return step


def _processed(ctx: _Context, micro: int) -> int:
    """Tokens processed per epoch at this micro-batch, padding included (summing the padding is O(examples))."""
    cache = ctx.caches["tokens"]
    return cache[micro] if micro in cache else cache.setdefault(micro, ctx.data.processed_tokens(micro))
