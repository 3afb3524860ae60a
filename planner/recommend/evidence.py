"""How far the time model was off on the published runs nearest a plan (catalogs/time_validation.json).

Nearest means, in this order: the same GPU, else the same GPU architecture, else any; then the same method
(LoRA and QLoRA count as neighbours, full fine-tuning is further); then the closest model size and tokens per
micro-batch on log scales, size weighing twice as much as tokens (size sets the shapes of every matmul, tokens
only how well a micro-batch fills the GPU).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.data.planning_rules import TimeValidation, ValidatedRun

NEAREST = 3


class EvidenceRun(BaseModel):
    """A published run and how far the time model was off on it."""

    id: str
    model: str
    params: int
    method: str
    gpu: str
    gpus: int
    tokens_per_micro_batch: float
    seq_len: float = Field(description="tokens per sequence")
    ratio: float = Field(description="predicted / measured step time: below 1 the run was slower than predicted")
    split: str = Field(description="train (the constants were fitted on it), held-out (never fitted), or a fresh "
                                   "block (collected after a model was fixed; fresh-1 has been fitted since)")
    source: str


class TimeEvidence(BaseModel):
    """The time model's record next to a plan: its nearest published runs, for a small model the runs of that
    size, and for long sequences the runs that long (all with a 2023 attention kernel)."""

    nearest: list[EvidenceRun]
    small_model_runs: list[EvidenceRun] = Field(description="published runs of models no larger than "
                                                            "small_model_max_params; empty for larger models")
    small_model_max_params: int
    long_context_runs: list[EvidenceRun] = Field(description="published runs with sequences of at least "
                                                             "long_context_min_seq_len tokens; empty for shorter plans")
    long_context_min_seq_len: int
    validated: str = Field(description="date of catalogs/time_validation.json")
    fp32_expert_share: float = Field(0.0, description="share of the plan's matmul FLOPs in MoE experts that "
                                                      "compute in fp32, counted at the half-precision rate; no "
                                                      "published run checks them")


def _method_distance(a: str, b: str) -> int:
    if a == b:
        return 0
    return 1 if {a, b} == {"lora", "qlora"} else 2


def distance(run: ValidatedRun, *, gpu: str, architecture: str, method: str, params: int,
             tokens: float) -> tuple[int, int, float]:
    """Sort key of a run for a plan: GPU tier, method distance, then size and tokens on log scales."""
    tier = 0 if run.gpu.lower() == gpu.lower() else 1 if run.gpu_architecture == architecture else 2
    size = abs(math.log(run.params / params))
    fill = abs(math.log(run.tokens_per_micro_batch / tokens))
    return tier, _method_distance(run.method, method), round(size + 0.5 * fill, 9)


def _figures(run: ValidatedRun) -> EvidenceRun:
    return EvidenceRun(id=run.id, model=run.model, params=run.params, method=run.method, gpu=run.gpu,
                       gpus=run.gpus, tokens_per_micro_batch=run.tokens_per_micro_batch, seq_len=run.seq_len,
                       ratio=run.ratio,
                       split=run.split, source=run.source)


def nearest_runs(validation: TimeValidation, *, gpu: str, architecture: str, method: str, params: int,
                 tokens: float, n: int = NEAREST) -> list[EvidenceRun]:
    """The `n` validated runs nearest a plan, nearest first (ties by run id)."""
    key = dict(gpu=gpu, architecture=architecture, method=method, params=params, tokens=max(tokens, 1.0))
    ranked = sorted(validation.runs, key=lambda r: (distance(r, **key), r.id))
    return [_figures(r) for r in ranked[:n]]


def time_evidence(validation: TimeValidation, *, gpu: str, architecture: str, method: str, params: int,
                  tokens: float, seq_len: float = 0.0) -> TimeEvidence:
    """The nearest runs, the small-model runs when the plan's model is small, and the long-context runs when
    its sequences are long; each caveat list sorted by ratio, slowest first."""
    by_ratio = sorted(validation.runs, key=lambda r: r.ratio)
    limit, long = validation.small_models.max_params, validation.long_context.min_seq_len
    small = [_figures(r) for r in by_ratio if r.params <= limit] if params <= limit else []
    long_runs = [_figures(r) for r in by_ratio if r.seq_len >= long] if seq_len >= long else []
    return TimeEvidence(nearest=nearest_runs(validation, gpu=gpu, architecture=architecture, method=method,
                                             params=params, tokens=tokens),
                        small_model_runs=small, small_model_max_params=limit, long_context_runs=long_runs,
                        long_context_min_seq_len=long, validated=validation.date)


def for_plan(gpu: str, method: str, params: int, tokens: float, fp32_expert_share: float = 0.0,
             seq_len: float = 0.0) -> TimeEvidence:
    """time_evidence() against the bundled validation, for a plan on the catalogued GPU `gpu`, with the share of
    its FLOPs that no published run checks (fp32 MoE experts)."""
    architecture = catalog.get_gpu(gpu).architecture
    found = time_evidence(catalog.time_validation(), gpu=gpu, architecture=architecture, method=method,
                          params=params, tokens=tokens, seq_len=seq_len)
    return found.model_copy(update={"fp32_expert_share": fp32_expert_share})
