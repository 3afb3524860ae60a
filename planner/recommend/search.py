"""`recommend`: search methods x instances x counts x settings, keep what fits, rank, explain.

The stages, each in its own module: grid (what is searched), memory_pass (each setting's memory once per
micro-batch, pruned by what no GPU could hold), evaluate (fit, host RAM, time and cost on every
instance type and count), rank (filter, rank, choose), explain (the reasons, as data).
"""

from __future__ import annotations

from ftplan.data import catalog
from ftplan.data.dataset import TokenBudget
from ftplan.errors import PlannerError
from ftplan.estimate.compute import fp32_expert_share
from ftplan.estimate.cost import check_region
from ftplan.estimate.published import published_check, required_at
from ftplan.estimate.settings import SetupChoices
from ftplan.model.layout import ModelLayout
from ftplan.model.spec import ModelSpec
from ftplan.recommend import evidence, explain, grid
from ftplan.recommend.evaluate import evaluate
from ftplan.recommend.memory_pass import memory_pass
from ftplan.recommend.models import Recommendation, SearchRequest
from ftplan.recommend.rank import choose, frontier

__all__ = ["SearchRequest", "Recommendation", "search"]


def search(spec: ModelSpec, layout: ModelLayout, data: TokenBudget, request: SearchRequest, choices: SetupChoices,
           fixed: set[str] = frozenset()) -> Recommendation:
    """Every candidate that fits, within budget and deadline, ranked by `request.priority`.

    `fixed` names the settings the user pinned (optimizer, grad_ckpt, targets); the rest are searched.
    Raises PlannerError naming the closest miss when nothing qualifies.
    """
    check_region(request.region, request.platform)
    instances = grid.instances(request)
    largest = max(catalog.gpu_of(i).memory_bytes for i in instances)
    settings = memory_pass(layout, request, choices, fixed, largest)
    outcome = evaluate(spec, layout, data, request, settings, instances)
    if not outcome.feasible:
        raise PlannerError(explain.nothing_qualifies(request, outcome, settings, largest))
    choice = choose(outcome.feasible, request.priority)
    best = choice.chosen
    check = published_check(best.method, best.sharding, "cuda", gpus=best.gpus_total)
    at_high = required_at(check.measured_over_estimated[1], best.peak_allocated_bytes,
                          best.required_bytes) if check else None
    return Recommendation(
        model=spec.name, data=data, request=request, recommended=best, best_single_instance=choice.best_single,
        candidates=choice.ranked[:10], frontier=frontier(outcome.feasible), reasons=explain.reasons(choice, request),
        evaluated=outcome.evaluated, kept=len(outcome.feasible), rejections=outcome.rejections,
        why_not=explain.why_not(choice, request, outcome, settings, largest)
        + explain.unsearched(request, layout, choices, fixed),
        assumptions=explain.assumptions(request, data, best),
        time_evidence=evidence.for_plan(best.gpu, best.method, layout.total_params(),
                                        best.time.tokens_per_micro_batch,
                                        fp32_expert_share(layout, best.setup, best.sharding == "fsdp"),
                                        seq_len=best.setup.seq_len),
        memory_evidence=check, required_at_published_high_bytes=at_high)
