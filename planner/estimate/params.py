"""Exact parameter counts: the base model's total and what each method trains.

Counts follow what transformers and PEFT instantiate: a tied head is counted once, and LoRA
adds r x (in + out) per adapted module (A: r x in, B: out x r), for linear, Conv1D and
embedding layers alike. Target names match as PEFT matches them: a module whose full name
equals the key or ends with '.' + key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ftplan.data.catalog import peft_default_targets
from ftplan.errors import PlannerError
from ftplan.estimate.settings import LoraSettings, Method
from ftplan.model.layout import ALL_LINEAR_KINDS, LORA_KINDS, PARAMETER_KINDS, ModelLayout, ModuleGroup

TargetSource = Literal["explicit", "all-linear", "peft-default", "all-linear (no PEFT default)"]


class TargetResolution(BaseModel):
    """Which module names LoRA adapts, and why those."""

    names: list[str]
    source: TargetSource

    @property
    def all_linear(self) -> bool:
        return self.source != "explicit" and self.source != "peft-default"

    def peft_value(self) -> str | list[str]:
        """What to pass as LoraConfig.target_modules to get exactly these adapters."""
        return "all-linear" if self.all_linear else list(self.names)


class ParamCounts(BaseModel):
    """Parameter counts for one method. `total_params` is the base model, adapters excluded."""

    method: Method
    total_params: int
    trainable_params: int
    adapter_params: int
    adapted_modules: int
    targets: TargetResolution | None = None


def _concrete(path: str) -> str:
    return path.replace(".N.", ".0.")


def matches(group: ModuleGroup, key: str) -> bool:
    """PEFT's name matching: the full module name equals `key` or ends with '.' + key."""
    path = _concrete(group.path)
    return path == key or path.endswith("." + key) or group.path == key or group.path.endswith("." + key)


def lora_candidates(layout: ModelLayout) -> list[str]:
    """Leaf names of the modules LoRA can adapt in this layout, in model order."""
    return list(dict.fromkeys(g.leaf for g in layout.modules if g.kind in LORA_KINDS))


def resolve_targets(layout: ModelLayout, requested: list[str] | None) -> TargetResolution:
    """Turn the user's target list (or None) into explicit module names, validated against the model."""
    if requested is None:
        default = peft_default_targets().get(layout.model_type)
        if default is not None:
            return TargetResolution(names=list(default), source="peft-default")
        requested, source = ["all-linear"], "all-linear (no PEFT default)"
    else:
        source = "explicit"
    if [t.lower() for t in requested] == ["all-linear"]:
        names = list(dict.fromkeys(g.leaf for g in layout.modules if g.kind in ALL_LINEAR_KINDS))
        return TargetResolution(names=names, source="all-linear" if source == "explicit" else source)
    if any(t.lower() == "all-linear" for t in requested):
        raise PlannerError("--lora-targets: 'all-linear' cannot be combined with other names; "
                           "pass either all-linear or a list such as q_proj,v_proj")
    for key in requested:
        hits = [g for g in layout.modules if matches(g, key)]
        if not hits:
            raise PlannerError(f"--lora-targets: {layout.model_type} has no module '{key}'; "
                               f"LoRA-able modules are: {', '.join(lora_candidates(layout))}")
        bad = [g for g in hits if g.kind not in LORA_KINDS]
        if bad and bad[0].kind in PARAMETER_KINDS:
            raise PlannerError(f"--lora-targets: '{key}' is a fused MoE {bad[0].kind} parameter, which PEFT adapts "
                               "only through all-linear; pass --lora-targets all-linear")
        if bad:
            raise PlannerError(f"--lora-targets: '{key}' is a {bad[0].kind} layer, which LoRA cannot adapt; "
                               f"choose among: {', '.join(lora_candidates(layout))}")
    return TargetResolution(names=list(dict.fromkeys(requested)), source="explicit")


def adapted_groups(layout: ModelLayout, targets: TargetResolution) -> list[ModuleGroup]:
    """The module groups that receive a LoRA adapter."""
    if targets.all_linear:
        return [g for g in layout.modules if g.kind in ALL_LINEAR_KINDS]
    return [g for g in layout.modules if g.kind in LORA_KINDS and any(matches(g, k) for k in targets.names)]


def lora_params(group: ModuleGroup, r: int) -> int:
    """Adapter parameters one instance of `group` gets: A (r x in) plus B (out x r)."""
    return r * group.lora_rank_factor * (group.in_features + group.out_features)


def folds_parameters(layout: ModelLayout, lora: LoraSettings) -> bool:
    """Whether `lora` adapts fused MoE parameters, which PEFT does through its ParamWrapper (no dropout)."""
    return any(g.kind in PARAMETER_KINDS for g in adapted_groups(layout, resolve_targets(layout, lora.targets)))


def fit_dropout(layout: ModelLayout, lora: LoraSettings) -> LoraSettings:
    """`lora` as PEFT can build it on `layout`: a dropout left at its default becomes 0 where ParamWrapper adapts
    fused MoE parameters; one the user set is kept (and refused by count_params)."""
    if lora.dropout == 0 or "dropout" in lora.model_fields_set or not folds_parameters(layout, lora):
        return lora
    return lora.model_copy(update={"dropout": 0.0})


def count_params(layout: ModelLayout, method: Method, lora: LoraSettings | None = None) -> ParamCounts:
    """Exact total and trainable parameters of `layout` under `method`."""
    total = layout.total_params()
    if method == "full":
        return ParamCounts(method=method, total_params=total, trainable_params=total, adapter_params=0,
                           adapted_modules=0)
    lora = lora or LoraSettings()
    targets = resolve_targets(layout, lora.targets)
    groups = adapted_groups(layout, targets)
    pinned = lora.dropout > 0 and "dropout" in lora.model_fields_set  # a default one is fitted (fit_dropout)
    if pinned and (folded := [g.leaf for g in groups if g.kind in PARAMETER_KINDS]):
        raise PlannerError(f"--lora-dropout {lora.dropout:g}: PEFT adapts {layout.model_type}'s fused MoE parameters "
                           f"({', '.join(folded)}) through its ParamWrapper, which takes no dropout; pass "
                           "--lora-dropout 0, or --lora-targets naming linear layers only (e.g. q_proj,v_proj)")
    adapters = sum(lora_params(g, lora.r) * layout.instances(g) for g in groups)
    return ParamCounts(method=method, total_params=total, trainable_params=adapters, adapter_params=adapters,
                       adapted_modules=sum(layout.instances(g) for g in groups), targets=targets)


def over_ranked(layout: ModelLayout, targets: TargetResolution, r: int) -> list[str]:
    """Adapted modules whose adapter (r x (in + out)) is at least as big as the layer (in x out):
    past that rank LoRA is not low-rank and trains more than full fine-tuning of the layer would."""
    return [g.path for g in adapted_groups(layout, targets)
            if g.kind != "embedding" and lora_params(g, r) >= g.in_features * g.out_features]
