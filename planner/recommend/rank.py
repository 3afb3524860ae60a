"""Stages 4 and 5 of the search: keep the best setting per slot, rank by priority, choose.

Every quality judgement is the candidate's `quality_tier` (shown beside it). The chosen plan is never
dominated - no candidate on no more instances, at least as good in quality, is both cheaper and faster -
and a plan on several instances is chosen only where it beats the best single-instance plan by the
catalogued margin on the priority's own figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftplan.data import catalog
from ftplan.recommend.models import Candidate, Priority


def best_per_slot(cands: list[Candidate]) -> list[Candidate]:
    """Per method, quality basis, instance type and count, the fastest setting (then the cheapest): the others
    in a slot are dominated."""
    best: dict[tuple, Candidate] = {}
    for c in cands:
        key = (c.method, c.quality_basis, c.instance_type, c.instance_count)
        if key not in best or (c.hours, c.cost_usd) < (best[key].hours, best[key].cost_usd):
            best[key] = c
    return list(best.values())


def scorer(cands: list[Candidate], priority: Priority):
    """The priority's ranking key (lower is better) and its primary figure (what the multi-instance margin
    is measured on): cost; balanced = relative cost x sqrt(relative hours) x (1 + penalty per quality tier);
    quality = tier first, then cost."""
    cheapest = min(c.cost_usd for c in cands)
    fastest = min(c.hours for c in cands)
    per_tier = catalog.quality().weighing.balanced_penalty_per_tier

    def balanced(c: Candidate) -> float:
        return (c.cost_usd / cheapest) * math.sqrt(c.hours / fastest) * (1 + per_tier * c.quality_tier)

    if priority == "cost":
        return (lambda c: (round(c.cost_usd, 6), c.hours, c.instance_count, c.instance_type)), (lambda c: c.cost_usd)
    if priority == "quality":
        return (lambda c: (c.quality_tier, round(c.cost_usd, 6), c.hours, c.instance_type)), (lambda c: c.cost_usd)
    return (lambda c: (balanced(c), c.cost_usd, c.instance_type)), balanced


def dominates(a: Candidate, b: Candidate) -> bool:
    """`a` is at least as good as `b` in quality, on no more instances, and both cheaper and faster."""
    return (a.quality_tier <= b.quality_tier and a.instance_count <= b.instance_count
            and a.cost_usd < b.cost_usd and a.hours < b.hours)


def frontier(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other is both cheaper and faster than, fastest first."""
    out: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.hours, c.cost_usd)):
        if not out or c.cost_usd < out[-1].cost_usd:
            out.append(c)
    return out


@dataclass
class Choice:
    """The ranking and the chosen plan, with the single-instance comparison behind it."""

    ranked: list[Candidate]
    chosen: Candidate
    best_single: Candidate | None
    multi_saving: float | None  # how much better the best multi-instance plan is on the primary figure
    margin: float
    kept_single: bool


def choose(feasible: list[Candidate], priority: Priority) -> Choice:
    """Rank the feasible candidates and pick one: the top-ranked, unless it uses several instances without
    beating the best single-instance plan by the margin; then never a dominated plan."""
    slots = best_per_slot(feasible)
    key, primary = scorer(slots, priority)
    ranked = sorted(slots, key=key)
    margin = catalog.planning().multi_instance.margin
    best_single = next((c for c in ranked if c.instance_count == 1), None)
    chosen, saving, kept_single = ranked[0], None, False
    if chosen.instance_count > 1 and best_single is not None:
        saving = 1 - primary(chosen) / primary(best_single) if primary(best_single) else 0.0
        better_tier = priority == "quality" and chosen.quality_tier < best_single.quality_tier
        if not better_tier and saving < margin:
            chosen, kept_single = best_single, True
    while dominating := [c for c in ranked if dominates(c, chosen)]:
        chosen = min(dominating, key=key)
    ranked = [chosen] + [c for c in ranked if c is not chosen]
    return Choice(ranked=ranked, chosen=chosen, best_single=best_single, multi_saving=saving, margin=margin,
                  kept_single=kept_single)
