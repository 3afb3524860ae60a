"""`recommend`: search methods x instances x counts x settings, keep what fits, rank, explain.

The search prunes by memory first: memory does not depend on the instance, so each setting's
per-GPU requirement is computed once per micro-batch (stopping at the first micro-batch that no
catalogued GPU holds), and each instance then takes the largest micro-batch its GPU holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from ftplan.data import calibration, catalog
from ftplan.data.dataset import TokenBudget
from ftplan.errors import PlannerError
from ftplan.estimate.compute import allreduce_seconds, gather_seconds, step_time
from ftplan.estimate.cost import HourlyPrice, Market, Platform, check_region, cost_usd, hourly_price
from ftplan.estimate.fit import gpu_supports
from ftplan.estimate.memory import MemoryBreakdown, estimate_memory
from ftplan.estimate.params import count_params
from ftplan.estimate.settings import Method, SetupChoices, TrainingSetup, resolve
from ftplan.estimate.sharding import shard
from ftplan.model.spec import ModelSpec

Priority = Literal["cost", "balanced", "quality"]
Task = Literal["instruction", "domain-adaptation", "continued-pretraining"]
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
INSTANCE_COUNTS = (1, 2, 4, 8, 16)
GIB = 2**30
FP16_FOR = {"bf16-mixed": "fp16-mixed", "bf16": "fp16"}  # GPUs without bf16 (T4, V100)


class SearchRequest(BaseModel):
    """What the user asked `recommend` for. None means 'search it'."""

    epochs: float = Field(1.0, gt=0)
    global_batch: int = Field(16, gt=0, description="sequences per optimizer step, across all GPUs")
    budget_usd: float | None = Field(None, gt=0)
    deadline_hours: float | None = Field(None, gt=0)
    priority: Priority = "balanced"
    task: Task = "instruction"
    region: str = "us-east-1"
    platform: Platform = "ec2"
    market: Market = "on-demand"
    spot_discount: float | None = Field(None, ge=0, lt=1)
    max_gpus: int = Field(8, gt=0)
    methods: list[Method] = ["full", "lora", "qlora"]
    instances: list[str] | None = None
    micro_batch: int | None = Field(None, gt=0, description="fixed micro-batch, or None to search")


class Candidate(BaseModel):
    """One way to train: a setting on N instances, with its memory, time and cost."""

    method: Method
    setup: TrainingSetup
    targets: str = Field(description="'all-linear', 'peft-default' or the explicit names (adapters only)")
    target_modules: str | list[str] | None = Field(description="LoraConfig.target_modules giving exactly these "
                                                                 "adapters (None: full fine-tuning)")
    instance_type: str
    instance_count: int
    gpu: str
    gpus_total: int
    sharding: str = Field("none", description="none (one GPU), ddp (a replica per GPU) or fsdp (parameters "
                                              "sharded over all GPUs)")
    grad_accum: int
    required_bytes: int = Field(description="per GPU")
    peak_allocated_bytes: int = Field(description="per GPU, what torch.cuda.max_memory_allocated() should read")
    gpu_memory_bytes: int
    hours: float = Field(description="billed wall-clock hours, setup included")
    train_hours: float
    cost_usd: float
    price: HourlyPrice
    tokens_per_second: float = Field(description="all GPUs together, padding included")
    utilization: float
    utilization_source: str
    optimizer_steps: int
    quality_tier: int
    quality_evidence: str

    @property
    def label(self) -> str:
        return f"{self.method} on {self.instance_count} x {self.instance_type}"


class Recommendation(BaseModel):
    """What `ftplan recommend --json` prints (schema_version 1)."""

    schema_version: int = 1
    model: str
    data: TokenBudget
    request: SearchRequest
    recommended: Candidate
    candidates: list[Candidate] = Field(description="the best plans in ranking order (the recommended first)")
    frontier: list[Candidate] = Field(description="cost-versus-time Pareto frontier, fastest first")
    reasons: list[str]
    rejections: dict[str, int] = Field(description="candidates dropped, by reason")
    why_not: list[str] = Field(description="why the best plan of each other method lost")
    evaluated: int
    assumptions: list[str]


@dataclass
class _Setting:
    """One searched training setting, with its single-GPU memory by micro-batch."""

    setup: TrainingSetup
    counts: object
    targets: str
    target_modules: str | list[str] | None
    memory: dict[int, MemoryBreakdown]  # micro-batch -> one GPU holding everything (sharded later if needed)


def _setting_grid(choices: SetupChoices, methods: list[Method], fixed: set[str]) -> list[TrainingSetup]:
    grid = []
    for method in methods:
        base = resolve(method, choices)
        optimizers = [base.optimizer] if "optimizer" in fixed or method != "full" else ["adamw", "adamw_8bit"]
        ckpts = [base.grad_ckpt] if "grad_ckpt" in fixed else [False, True]
        target_sets = [choices.lora.targets] if method == "full" or "targets" in fixed else [None, ["all-linear"]]
        for opt in optimizers:
            for ckpt in ckpts:
                for targets in target_sets:
                    lora = choices.lora.model_copy(update={"targets": targets}) if method != "full" else None
                    grid.append(base.model_copy(update={"optimizer": opt, "grad_ckpt": ckpt, "lora": lora}))
    return grid


def _instances(request: SearchRequest) -> list[catalog.Instance]:
    if request.instances:
        return [catalog.get_instance(t) for t in request.instances]
    return list(catalog.instances().values())


def _micro_batches(request: SearchRequest) -> tuple[int, ...]:
    if request.micro_batch:
        return (request.micro_batch,)
    return tuple(b for b in MICRO_BATCHES if b <= request.global_batch)


def search(spec: ModelSpec, layout, data: TokenBudget, request: SearchRequest, choices: SetupChoices,
           fixed: set[str] = frozenset()) -> Recommendation:
    """Every candidate that fits, within budget and deadline, ranked by `request.priority`.

    `fixed` names the settings the user pinned (optimizer, grad_ckpt, targets); the rest are searched.
    Raises PlannerError naming the closest miss when nothing qualifies.
    """
    check_region(request.region)
    instances = _instances(request)
    largest = max(catalog.gpu_of(i).memory_bytes for i in instances)
    rejections: dict[str, int] = {}

    def reject(reason: str) -> None:
        rejections[reason] = rejections.get(reason, 0) + 1

    settings, closest_fit, smallest_need = _memory_pass(layout, request, choices, fixed, largest, reject)

    quality = catalog.quality().tasks[request.task]
    weigh = catalog.quality().weighing
    overhead = catalog.throughput().overhead.setup_seconds
    sequences = data.sequences()
    steps_per_epoch = math.ceil(sequences / request.global_batch)
    optimizer_steps = math.ceil(steps_per_epoch * request.epochs)
    feasible: list[Candidate] = []
    over_budget: list[Candidate] = []
    over_deadline: list[Candidate] = []
    evaluated = 0
    time_cache: dict[tuple, object] = {}
    shard_cache: dict[tuple, object] = {}
    setup_cache: dict[tuple, TrainingSetup] = {}
    total_params = layout.total_params()
    calibrations = calibration.load()
    sagemaker_types = set(catalog.pricing().sagemaker.training_instance_types)
    for inst in instances:
        if request.platform == "sagemaker" and inst.type not in sagemaker_types:
            reject("not offered by SageMaker for training")
            continue
        gpu = catalog.gpu_of(inst)
        price = hourly_price(inst, request.region, request.platform, request.market, request.spot_discount)
        if price is None:
            reject(f"no {request.platform} price in {request.region}")
            continue
        for st in settings:
            setup = st.setup if gpu.supports_bf16 else st.setup.model_copy(
                update={"precision": FP16_FOR.get(st.setup.precision, st.setup.precision)})  # same bytes
            if reason := gpu_supports(gpu, setup):
                reject(reason.split(" (")[0])
                continue
            replica = _replicas(st, gpu.memory_bytes)
            calib = calibrations.find(gpu.name, spec.name, setup.method)
            util = (calib.utilization, f"calibrated by {calib.source} on {calib.date}") if calib else None
            for count in INSTANCE_COUNTS:
                world = count * inst.gpu_count
                if world > request.max_gpus:
                    break
                scheme, needs = _fit(st, replica, layout, setup, gpu.memory_bytes, world, count,
                                     request.global_batch, shard_cache)
                if not needs:
                    reject("does not fit this GPU" if scheme is None else "does not fit this GPU, even sharded")
                    continue
                micros = [m for m in needs if request.global_batch % (m * world) == 0]
                if not micros:
                    reject("global batch not divisible across the GPUs")
                    continue
                micro = max(micros)
                # host RAM to load the checkpoint: every process (a replica each), or once per node with FSDP
                loading = st.memory[micro].weights_bytes * (1 if scheme == "fsdp" else inst.gpu_count)
                if loading > inst.memory_gib * GIB:
                    reject("not enough host RAM to load the checkpoint")
                    continue
                evaluated += 1
                accum = request.global_batch // (micro * world)
                skey = (id(st), micro, setup.precision)
                micro_setup = setup_cache.get(skey) or setup_cache.setdefault(
                    skey, setup.model_copy(update={"batch_size": micro}))
                tkey = (id(st), micro, gpu.name, setup.precision)
                timing = time_cache.get(tkey)
                if timing is None:
                    per_seq = data.processed_tokens(micro) / sequences
                    timing = time_cache[tkey] = step_time(layout, micro_setup, st.counts, gpu, micro_batch=micro,
                                                          tokens_per_sequence=per_seq, utilization=util)
                comm = allreduce_seconds(st.memory[micro].gradients_bytes, inst, count) if world > 1 else 0.0
                if scheme == "fsdp":  # every micro-batch gathers the weights (twice, thrice with recompute)
                    passes = 3 if setup.grad_ckpt else 2
                    comm += accum * gather_seconds(passes * total_params * 2, inst, count)
                step_seconds = accum * timing.seconds + comm
                train = optimizer_steps * step_seconds
                total = train + overhead
                tier = quality[setup.method]
                required, peak_bytes = needs[micro]
                # model_construct: every field comes from validated objects, and this loop is the hot path
                cand = Candidate.model_construct(
                    method=setup.method, setup=micro_setup, targets=st.targets,
                    target_modules=st.target_modules, instance_type=inst.type, instance_count=count,
                    gpu=gpu.name, gpus_total=world, sharding=scheme, grad_accum=accum, required_bytes=required,
                    peak_allocated_bytes=peak_bytes, gpu_memory_bytes=gpu.memory_bytes, hours=total / 3600,
                    train_hours=train / 3600, cost_usd=cost_usd(total, price, count), price=price,
                    tokens_per_second=world * timing.tokens / step_seconds * accum, utilization=timing.utilization,
                    utilization_source=timing.utilization_source, optimizer_steps=optimizer_steps,
                    quality_tier=tier.tier, quality_evidence=tier.evidence)
                if request.budget_usd is not None and cand.cost_usd > request.budget_usd:
                    reject("over budget")
                    over_budget.append(cand)
                elif request.deadline_hours is not None and cand.hours > request.deadline_hours:
                    reject("over deadline")
                    over_deadline.append(cand)
                else:
                    feasible.append(cand)
    if not feasible:
        raise PlannerError(_nothing_qualifies(request, None if settings else closest_fit, largest, over_budget,
                                              over_deadline, rejections))
    ranked = rank(_best_per_slot(feasible), request.priority, weigh)
    best = ranked[0]
    return Recommendation(
        model=spec.name, data=data, request=request, recommended=best, candidates=ranked[:10],
        frontier=frontier(feasible), reasons=reasons(best, ranked, request), rejections=rejections,
        why_not=why_not(best, ranked, request, smallest_need, largest, over_budget + over_deadline),
        evaluated=evaluated,
        assumptions=assumptions(request, data, ranked[0]),
    )


def _memory_pass(layout, request: SearchRequest, choices: SetupChoices, fixed: set[str], largest: int, reject):
    """Single-GPU memory of every searched setting by micro-batch, pruned by what no GPU could hold even
    sharded over every GPU allowed. Also returns the closest miss and each method's least requirement."""
    settings: list[_Setting] = []
    closest_fit: tuple[int, str] | None = None
    smallest_need: dict[str, int] = {}  # method -> least bytes per GPU any of its settings needs
    count_cache: dict[tuple, object] = {}
    max_world = 2 ** int(math.log2(request.max_gpus))  # worlds are powers of two (global batches usually are)
    micros = _micro_batches(request)
    for setup in _setting_grid(choices, request.methods, fixed):
        key = (setup.method, tuple(setup.lora.targets or ()) if setup.lora else None)
        counts = count_cache.get(key) or count_cache.setdefault(key, count_params(layout, setup.method, setup.lora))
        breakdowns = {}
        for micro in micros:
            memory = estimate_memory(layout, setup.model_copy(update={"batch_size": micro}), counts)
            need = memory.required_bytes
            if need > largest and max_world > 1:  # the least it can need: sharded over every GPU allowed
                need = min(need, shard(layout, setup, memory, gpus=max_world, sharding="fsdp").required_bytes)
            smallest_need[setup.method] = min(need, smallest_need.get(setup.method, need))
            if need > largest:  # larger micro-batches only need more
                if micro == micros[0] and (closest_fit is None or need < closest_fit[0]):
                    closest_fit = (need, f"{setup.method} ({_describe(setup)})")
                reject("does not fit any GPU searched")
                break
            breakdowns[micro] = memory
        if breakdowns:
            targets = "" if counts.targets is None else (
                "all-linear" if counts.targets.all_linear else
                "peft-default" if counts.targets.source == "peft-default" else ",".join(counts.targets.names))
            modules = counts.targets.peft_value() if counts.targets else None
            settings.append(_Setting(setup, counts, targets, modules, breakdowns))
    return settings, closest_fit, smallest_need


def _replicas(st: _Setting, gpu_bytes: int) -> dict[int, tuple[int, int]]:
    """Micro-batches whose whole replica fits one GPU, with (required, peak) bytes."""
    return {m: (mem.required_bytes, mem.peak_allocated_bytes) for m, mem in st.memory.items()
            if mem.required_bytes <= gpu_bytes}


def _fit(st: _Setting, replica: dict[int, tuple[int, int]], layout, setup: TrainingSetup, gpu_bytes: int,
         world: int, count: int, global_batch: int, shard_cache: dict) -> tuple[str | None, dict[int, tuple[int, int]]]:
    """How `st` runs on `world` GPUs of `gpu_bytes` each: a whole replica per GPU (none/ddp) when one fits
    (`replica`, from _replicas), else FSDP over all of them; and the micro-batches that fit, with
    (required, peak) bytes per GPU."""
    if replica:
        return ("none" if world == 1 else "ddp"), replica
    if world == 1:
        return None, {}
    for m in sorted(st.memory, reverse=True):  # the largest micro-batch that fits sharded; larger ones need more
        if global_batch % (m * world):
            continue
        key = (id(st), m, world, count)
        sharded = shard_cache.get(key) or shard_cache.setdefault(
            key, shard(layout, setup, st.memory[m], gpus=world, nodes=count, sharding="fsdp"))
        if sharded.required_bytes <= gpu_bytes:
            return "fsdp", {m: (sharded.required_bytes, sharded.peak_allocated_bytes)}
    return "fsdp", {}


def _describe(setup: TrainingSetup) -> str:
    return (f"micro-batch {setup.batch_size} x {setup.seq_len}, {setup.optimizer}, "
            f"checkpointing {'on' if setup.grad_ckpt else 'off'}")


def _best_per_slot(cands: list[Candidate]) -> list[Candidate]:
    """Per method, instance type and count, the fastest setting (then cheapest): the rest are dominated
    unless their targets differ (quality)."""
    best: dict[tuple, Candidate] = {}
    for c in cands:
        key = (c.method, c.targets == "peft-default", c.instance_type, c.instance_count)
        if key not in best or (c.hours, c.cost_usd) < (best[key].hours, best[key].cost_usd):
            best[key] = c
    return list(best.values())


def rank(cands: list[Candidate], priority: Priority, weigh: dict) -> list[Candidate]:
    """Order candidates: cost (cheapest, then fastest), quality (best tier, all-linear, then cheapest),
    or balanced (relative cost x sqrt(relative hours) x quality penalty)."""
    if priority == "cost":
        return sorted(cands, key=lambda c: (round(c.cost_usd, 6), c.hours, c.instance_type))
    if priority == "quality":
        return sorted(cands, key=lambda c: (c.quality_tier, c.targets == "peft-default", round(c.cost_usd, 6), c.hours))
    cheapest = min(c.cost_usd for c in cands)
    fastest = min(c.hours for c in cands)

    def score(c: Candidate) -> float:
        penalty = 1 + weigh.balanced_penalty_per_tier * c.quality_tier + (
            weigh.default_targets_penalty if c.targets == "peft-default" else 0)
        return (c.cost_usd / cheapest) * math.sqrt(c.hours / fastest) * penalty

    return sorted(cands, key=lambda c: (score(c), c.cost_usd, c.instance_type))


def frontier(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other is both cheaper and faster than, fastest first."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.hours, c.cost_usd)):
        if not out or c.cost_usd < out[-1].cost_usd:
            out.append(c)
    return out


def reasons(best: Candidate, ranked: list[Candidate], request: SearchRequest) -> list[str]:
    """Why `best` was chosen, in words."""
    out = [{"cost": "the cheapest plan that fits and meets the constraints",
            "quality": "the cheapest plan in the best quality tier for the task",
            "balanced": "the best balance of cost, time and quality among the plans that fit"}[request.priority]
           + f" ({len(ranked)} ranked)"]
    out.append(f"fits with {(best.gpu_memory_bytes - best.required_bytes) / GIB:.1f} GiB headroom on each of "
               f"{best.gpus_total} {best.gpu} GPU(s) ({best.required_bytes / GIB:.1f} of "
               f"{best.gpu_memory_bytes / GIB:.1f} GiB)")
    if request.budget_usd is not None:
        out.append(f"${best.cost_usd:,.2f} is {best.cost_usd / request.budget_usd:.0%} of the "
                   f"${request.budget_usd:,.2f} budget")
    if request.deadline_hours is not None:
        out.append(f"{best.hours:.1f} h is within the {request.deadline_hours:g} h deadline")
    out.append(f"quality for {request.task}: {best.quality_evidence}")
    return out


def why_not(best: Candidate, ranked: list[Candidate], request: SearchRequest, smallest_need: dict[str, int],
            largest: int, over_limits: list[Candidate]) -> list[str]:
    """For each method other than the recommended one: its best plan and how it compares, or why it has
    none - short of memory by how much, or over the budget or deadline by how much."""
    out = []
    for method in request.methods:
        if method == best.method:
            continue
        own = [c for c in ranked if c.method == method]
        missed = [c for c in over_limits if c.method == method]
        if own:
            c = own[0]
            out.append(f"{method}: best is {c.instance_count} x {c.instance_type} at ${c.cost_usd:,.2f} and "
                       f"{c.hours:.1f} h ({_relative(c.cost_usd, best.cost_usd)} cost, "
                       f"{_relative(c.hours, best.hours)} time, quality tier {c.quality_tier} vs {best.quality_tier})")
        elif missed:
            cheapest = min(missed, key=lambda c: c.cost_usd)
            fastest = min(missed, key=lambda c: c.hours)
            limits = []
            if request.budget_usd is not None:
                limits.append(f"cheapest ${cheapest.cost_usd:,.2f} vs the ${request.budget_usd:,.2f} budget")
            if request.deadline_hours is not None:
                limits.append(f"fastest {fastest.hours:.1f} h vs the {request.deadline_hours:g} h deadline")
            out.append(f"{method}: every plan that fits misses the limits ({'; '.join(limits)})")
        elif method in smallest_need:
            short = (smallest_need[method] - largest) / GIB
            out.append(f"{method}: needs at least {smallest_need[method] / GIB:.1f} GiB per GPU; the largest GPU "
                       f"searched has {largest / GIB:.1f} GiB ({short:.1f} GiB short)")
        else:
            out.append(f"{method}: no instance searched supports its settings")
    return out


def _relative(value: float, ref: float) -> str:
    return f"{value / ref - 1:+.0%}" if ref else "n/a"


def _nothing_qualifies(request: SearchRequest, closest_fit, largest: int, over_budget: list[Candidate],
                       over_deadline: list[Candidate], rejections: dict[str, int]) -> str:
    if over_budget or over_deadline:
        parts = []
        if over_budget:
            c = min(over_budget, key=lambda c: c.cost_usd)
            parts.append(f"nothing fits the ${request.budget_usd:,.2f} budget: the cheapest plan costs "
                         f"${c.cost_usd:,.2f} ({c.label}, {c.hours:.1f} h), ${c.cost_usd - request.budget_usd:,.2f} "
                         "over; raise --budget or train on fewer tokens")
        if over_deadline:
            c = min(over_deadline, key=lambda c: c.hours)
            parts.append(f"nothing finishes within {request.deadline_hours:g} h: the fastest plan takes "
                         f"{c.hours:.1f} h ({c.label}, ${c.cost_usd:,.2f}), {c.hours - request.deadline_hours:.1f} h "
                         "over; raise --deadline or --max-gpus")
        return "; ".join(parts)
    if closest_fit is not None:
        need, what = closest_fit
        return (f"nothing fits: the smallest requirement is {need / GIB:.1f} GiB per GPU ({what}) and the largest GPU "
                f"searched has {largest / GIB:.1f} GiB; try --methods qlora, a shorter --seq-len or more --instances")
    reasons = ", ".join(f"{reason} ({n})" for reason, n in sorted(rejections.items(), key=lambda kv: -kv[1])[:3])
    return f"no plan qualifies: {reasons or 'no instance searched'}; widen --instances, --max-gpus or --region"


def assumptions(request: SearchRequest, data: TokenBudget, best: Candidate) -> list[str]:
    """The modelling choices behind the times and prices, in words."""
    rules = catalog.throughput()
    notes = [
        f"data: {data.tokens:,} tokens per epoch from {data.source} ({data.counting}), "
        + ("packed into full sequences" if data.packing else "one example per sequence, padded per micro-batch"),
        f"time = FLOPs (forward, backward, recomputation, attention) / (dense peak x utilisation); "
        f"recommended plan's utilisation {best.utilization:.0%}: {best.utilization_source}",
        "QLoRA adds the memory-bound dequantization of every 4-bit weight in each pass "
        f"({rules.dequantization.bytes_per_weight} bytes per weight at "
        f"{rules.dequantization.bandwidth_efficiency:.0%} of peak bandwidth)",
        "host RAM must hold the checkpoint as loaded: once per process, or once per node with FSDP",
        "several GPUs: data parallel with a whole replica per GPU (DDP) when it fits, else FSDP with parameters, "
        "gradients and optimizer states sharded over all GPUs (weights gathered in bf16 every forward, backward "
        "and recomputation); gradients all-reduced once per optimizer step; communication not overlapped with "
        "compute; NVLink/NVSwitch or PCIe inside an instance, the instance network between instances (half of it "
        "without EFA)",
        f"billed time adds {rules.overhead.setup_seconds // 60:.0f} minutes of setup "
        "(boot, model download and load); per-second billing",
        f"global batch {request.global_batch} sequences per optimizer step (micro-batch x GPUs x accumulation)",
        f"quality weighing: {catalog.quality().weighing.about}",
    ]
    if request.market == "spot":
        notes.append(f"spot: {catalog.pricing().spot.caveat}")
    if best.price.warning:
        notes.append(best.price.warning)
    return notes
