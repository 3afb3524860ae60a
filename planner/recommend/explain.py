"""Stage 6 of the search: the explanation, as data - why this plan, why not the other methods, which
assumptions - with every figure a number the render layer words."""

from __future__ import annotations

from ftplan.data import catalog
from ftplan.data.dataset import TokenBudget
from ftplan.estimate.params import folds_parameters
from ftplan.estimate.settings import SetupChoices
from ftplan.model.layout import ModelLayout
from ftplan.recommend import evaluate as ev
from ftplan.recommend.memory_pass import Setting
from ftplan.recommend.models import Assumption, Candidate, Reason, SearchRequest, WhyNot
from ftplan.recommend.rank import Choice

GIB = 2**30


def reasons(choice: Choice, request: SearchRequest) -> list[Reason]:
    """Why the chosen plan: the priority, its memory headroom, budget and deadline use, its quality evidence,
    and how it compares with the best single-instance plan."""
    best = choice.chosen
    out = [Reason(code="priority", figures={"priority": request.priority, "ranked": len(choice.ranked)}),
           Reason(code="headroom", figures={"headroom_bytes": best.gpu_memory_bytes - best.required_bytes,
                                            "required_bytes": best.required_bytes,
                                            "gpu_memory_bytes": best.gpu_memory_bytes, "gpus": best.gpus_total,
                                            "gpu": best.gpu})]
    if request.budget_usd is not None:
        out.append(Reason(code="budget", figures={"cost_usd": best.cost_usd, "budget_usd": request.budget_usd}))
    if request.deadline_hours is not None:
        out.append(Reason(code="deadline", figures={"hours": best.hours, "deadline_hours": request.deadline_hours}))
    out.append(Reason(code="quality", figures={"task": request.task, "tier": best.quality_tier,
                                               "basis": best.quality_basis, "evidence": best.quality_evidence}))
    if choice.kept_single:
        multi = next(c for c in choice.ranked if c.instance_count > 1)
        out.append(Reason(code="single_instance_kept", figures={
            "instances": multi.instance_count, "instance_type": multi.instance_type, "saving": choice.multi_saving,
            "margin": choice.margin}))
    elif best.instance_count > 1:
        out.append(Reason(code="multi_instance_wins", figures={
            "saving": choice.multi_saving, "margin": choice.margin,
            "single_instance_type": choice.best_single.instance_type if choice.best_single else None}))
    return out


def unsearched(request: SearchRequest, layout: ModelLayout, choices: SetupChoices, fixed: set[str]) -> list[WhyNot]:
    """Adapter methods whose all-linear plans were left out because the user set a dropout that PEFT's
    ParamWrapper (fused MoE parameters) cannot take."""
    lora = choices.lora.model_copy(update={"targets": ["all-linear"]})
    if "targets" in fixed or lora.dropout == 0 or "dropout" not in lora.model_fields_set \
            or not folds_parameters(layout, lora):
        return []
    return [WhyNot(method=m, code="all_linear_not_searched", figures={"dropout": lora.dropout,
                                                                      "model_type": layout.model_type})
            for m in request.methods if m != "full"]


def why_not(choice: Choice, request: SearchRequest, outcome: ev.Outcome, settings: list[Setting],
            largest_gpu_bytes: int) -> list[WhyNot]:
    """For each method other than the chosen one: its best plan and how it compares, or what stopped it -
    the limits (by how much), memory (by how much), --max-gpus (which instance would hold it), the GPUs."""
    best = choice.chosen
    missed = outcome.over_budget + outcome.over_deadline
    out = []
    for method in request.methods:
        if method == best.method:
            continue
        own = [c for c in choice.ranked if c.method == method]
        over = [c for c in missed if c.method == method]
        least = min((s.least_bytes for s in settings if s.setup.method == method), default=None)
        if own:
            c = own[0]
            out.append(WhyNot(method=method, code="ranked_lower", figures={
                "instances": c.instance_count, "instance_type": c.instance_type, "cost_usd": c.cost_usd,
                "hours": c.hours, "quality_tier": c.quality_tier, "basis": c.quality_basis,
                "vs_cost_usd": best.cost_usd, "vs_hours": best.hours, "vs_quality_tier": best.quality_tier}))
        elif over:
            cheapest, fastest = min(over, key=lambda c: c.cost_usd), min(over, key=lambda c: c.hours)
            out.append(WhyNot(method=method, code="misses_limits", figures={
                "cheapest_usd": cheapest.cost_usd, "budget_usd": request.budget_usd,
                "fastest_hours": fastest.hours, "deadline_hours": request.deadline_hours}))
        elif method in outcome.wider:
            gpus, instance_type, gpu = outcome.wider[method]
            out.append(WhyNot(method=method, code="needs_more_gpus", figures={
                "instance_type": instance_type, "gpus": gpus, "gpu": gpu, "max_gpus": request.max_gpus}))
        elif least is not None and least > largest_gpu_bytes:
            out.append(WhyNot(method=method, code="needs_more_memory", figures={
                "least_bytes": least, "largest_gpu_bytes": largest_gpu_bytes,
                "short_bytes": least - largest_gpu_bytes, "max_gpus": request.max_gpus}))
        else:
            stopped = outcome.by_method.get(method, {})
            top = max(stopped, key=stopped.get) if stopped else None
            out.append(WhyNot(method=method, code="unsupported" if top else "no_instance",
                              figures={"reason": top, "combinations": stopped.get(top, 0) if top else 0}))
    return out


def nothing_qualifies(request: SearchRequest, outcome: ev.Outcome, settings: list[Setting],
                      largest_gpu_bytes: int) -> str:
    """The error when no plan qualifies, naming the closest miss and the fix."""
    if outcome.over_budget or outcome.over_deadline:
        parts = []
        if outcome.over_budget:
            c = min(outcome.over_budget, key=lambda c: c.cost_usd)
            parts.append(f"nothing fits the ${request.budget_usd:,.2f} budget: the cheapest plan costs "
                         f"${c.cost_usd:,.2f} ({c.label}, {c.hours:.1f} h), ${c.cost_usd - request.budget_usd:,.2f} "
                         "over; raise --budget or train on fewer tokens")
        if outcome.over_deadline:
            c = min(outcome.over_deadline, key=lambda c: c.hours)
            parts.append(f"nothing finishes within {request.deadline_hours:g} h: the fastest plan takes "
                         f"{c.hours:.1f} h ({c.label}, ${c.cost_usd:,.2f}), {c.hours - request.deadline_hours:.1f} h "
                         "over; raise --deadline or --max-gpus")
        return "; ".join(parts)
    if outcome.wider:
        gpus, instance_type, gpu = min(outcome.wider.values())
        return (f"nothing fits within --max-gpus {request.max_gpus}: the smallest instance that holds it is "
                f"{instance_type} ({gpus} x {gpu}); raise --max-gpus to {gpus} or try --methods qlora")
    if settings and all(not s.memory for s in settings):
        least = min(settings, key=lambda s: s.least_bytes)
        return (f"nothing fits: the smallest requirement is {least.least_bytes / GIB:.1f} GiB per GPU "
                f"({least.setup.method}, micro-batch 1 x {least.setup.seq_len}) and the largest GPU searched has "
                f"{largest_gpu_bytes / GIB:.1f} GiB; try --methods qlora, a shorter --seq-len or more --instances")
    top = sorted(outcome.rejections.items(), key=lambda kv: -kv[1])[:3]
    reasons_text = ", ".join(f"{ev.describe_drop(code)} ({n})" for code, n in top)
    return f"no plan qualifies: {reasons_text or 'no instance searched'}; widen --instances, --max-gpus or --region"


def assumptions(request: SearchRequest, data: TokenBudget, best: Candidate) -> list[Assumption]:
    """The modelling choices behind the times and prices, as figures."""
    rules = catalog.throughput()
    out = [
        Assumption(code="data", figures={"tokens": data.tokens, "source": data.source, "counting": data.counting,
                                         "packing": data.packing}),
        Assumption(code="time_model", figures={
            "utilization": best.utilization, "u_max": best.time.u_max, "source": best.utilization_source,
            "t_half_tokens": best.time.t_half_tokens, "tokens_per_micro_batch": best.time.tokens_per_micro_batch,
            "bound": best.time.bound, "optimizer_seconds": best.time.optimizer_seconds,
            "elementwise_seconds": best.time.elementwise_seconds,
            "elementwise_bytes_per_hidden": rules.elementwise.bytes_per_hidden,
            "attention_seconds": best.time.attention_seconds,
            "eager_bytes_per_score": rules.eager_attention.bytes_per_score,
            "attention_kernel_ratio": best.time.attention_kernel_ratio,
            "launch_floor_seconds_per_layer_pass": rules.launch_floor.seconds_per_layer_pass}),
    ]
    out.append(Assumption(code="host_ram", figures={}))
    if best.gpus_total > 1:
        out.append(Assumption(code="parallelism", figures={
            "sharding": best.sharding, "allreduce_overlap": rules.communication.allreduce_overlap,
            "gathers_per_micro_batch": rules.communication.fsdp_gathers_per_micro_batch}))
    out += [
        Assumption(code="setup", figures={"setup_seconds": rules.overhead.setup_seconds,
                                          "cluster_launch_seconds": rules.overhead.cluster_launch_seconds}),
        Assumption(code="global_batch", figures={"sequences": request.global_batch}),
        Assumption(code="quality_weighing", figures={"about": catalog.quality().weighing.about}),
        Assumption(code="multi_instance_margin", figures={"margin": catalog.planning().multi_instance.margin,
                                                          "source": catalog.planning().multi_instance.source}),
    ]
    if best.setup.method == "qlora":  # only a 4-bit base is dequantized; other plans must not carry the line
        out.insert(2, Assumption(code="dequantization", figures={
            "bytes_per_weight": rules.dequantization.bytes_per_weight,
            "bandwidth_efficiency": rules.dequantization.bandwidth_efficiency}))
    if request.market == "spot":
        out.append(Assumption(code="spot", figures={"caveat": catalog.pricing().spot.caveat}))
    if best.price.warning:
        out.append(Assumption(code="stale_price", figures={"warning": best.price.warning}))
    return out
