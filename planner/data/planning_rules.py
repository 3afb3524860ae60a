"""Typed models of the catalogued rules only recommend and the time model read: throughput, quality, the search
grid and recipes, and the time model's validation. Loaded once by ftplan.data.catalog."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ftplan.data.rules import _Rules


# -- throughput.json ------------------------------------------------------------------------------
class GpuUtilization(_Rules):
    gpu: str
    u_max: float = Field(gt=0, le=1)
    source: str


class ArchitectureUtilization(_Rules):
    architecture: str
    u_max: float = Field(gt=0, le=1)
    source: str


class Utilization(_Rules):
    about: str
    kappa: float = Field(gt=0, description="t_half = kappa x peak FLOP/s / memory bytes/s, in tokens")
    kappa_source: str
    gpus: list[GpuUtilization]
    architectures: list[ArchitectureUtilization]
    fallback: float = Field(gt=0, le=1, description="u_max for a GPU architecture with no row")
    fallback_source: str

    def u_max(self, gpu: str, architecture: str) -> tuple[float, str]:
        """The ceiling for a GPU: its own fitted row, else its architecture's, else the fallback; with the source."""
        for row in self.gpus:
            if row.gpu.lower() == gpu.lower():
                return row.u_max, f"fitted for {row.gpu}: {row.source}"
        for arch in self.architectures:
            if arch.architecture == architecture:
                return arch.u_max, f"{architecture} default: {arch.source}"
        return self.fallback, self.fallback_source


class LaunchFloor(_Rules):
    about: str
    seconds_per_layer_pass: float = Field(ge=0)
    source: str


class Dequantization(_Rules):
    about: str
    bytes_per_weight: float = Field(gt=0)
    bandwidth_efficiency: float = Field(gt=0, le=1)
    source: str


class Elementwise(_Rules):
    about: str
    bytes_per_hidden: float = Field(ge=0, description="bytes read and written per token, decoder layer, hidden "
                                                       "unit and forward-equivalent pass")
    source: str


class EagerAttention(_Rules):
    about: str
    forward_bytes_per_score: float = Field(ge=0, description="bytes read and written per attention score (query "
                                                             "head x query x key) in one forward, eager attention")
    backward_bytes_per_score: float = Field(ge=0, description="the same in one backward")
    source: str

    @property
    def bytes_per_score(self) -> float:
        """Per score and step without checkpointing: what a calibration records it was solved with."""
        return self.forward_bytes_per_score + self.backward_bytes_per_score


class OptimizerStep(_Rules):
    about: str
    passes_per_byte: float = Field(ge=0)
    source: str


class Communication(_Rules):
    about: str
    bus_efficiency: float = Field(gt=0, le=1)
    intra_node_gbytes_per_s: dict[str, float]
    intra_node_source: str
    inter_node_without_efa_factor: float = Field(gt=0, le=1)
    inter_node_source: str
    network_floor_gbytes_per_s: float = Field(gt=0)
    network_floor_source: str
    fsdp_gathers_per_micro_batch: int = Field(ge=1)
    allreduce_overlap: float = Field(ge=0, le=1, description="share of one micro-batch's compute that hides the "
                                                             "gradient all-reduce")
    overlap_source: str


class Overhead(_Rules):
    setup_seconds: float = Field(ge=0, description="billed per instance: boot, packages, model download and load")
    about: str
    cluster_launch_seconds: float = Field(ge=0, description="billed per instance of a multi-instance plan")
    cluster_launch_about: str


class AttentionKernel(_Rules):
    kernel: str
    implementations: list[str] = Field(description="attn_implementation names that run this kernel (none: a kernel "
                                                   "ftplan's settings cannot name, kept for the published runs)")
    ratio_to_matmul: dict[str, float] = Field(description="by GPU architecture ('default': the others): the "
                                                          "kernel's training throughput of ftplan's attention "
                                                          "FLOPs over a large matmul's on the same GPU")
    source: str

    @field_validator("ratio_to_matmul")
    @classmethod
    def _a_default_in_range(cls, ratios: dict[str, float]) -> dict[str, float]:
        if "default" not in ratios or not all(0 < r <= 1 for r in ratios.values()):
            raise ValueError("ratio_to_matmul needs a 'default' and every ratio in (0, 1]")
        return ratios


class FusedAttention(_Rules):
    about: str
    kernels: list[AttentionKernel]

    def kernel(self, kernel_or_implementation: str) -> AttentionKernel | None:
        """The catalogued kernel a kernel name or an attn_implementation names (None: eager, or none known)."""
        return next((k for k in self.kernels
                     if kernel_or_implementation == k.kernel or kernel_or_implementation in k.implementations), None)

    def ratio(self, kernel_or_implementation: str, architecture: str) -> float:
        """The throughput ratio of attention's FLOPs to the matmuls' for a kernel or an attn_implementation on a
        GPU architecture (1.0 where none is catalogued: eager's score matmuls are batched matmuls)."""
        if (k := self.kernel(kernel_or_implementation)) is None:
            return 1.0
        return k.ratio_to_matmul.get(architecture, k.ratio_to_matmul["default"])


class Throughput(_Rules):
    """catalogs/throughput.json: the time model's constants, each with its source."""

    schema_: int = Field(alias="schema")
    retrieved: str
    about: str
    utilization: Utilization
    launch_floor: LaunchFloor
    dequantization: Dequantization
    elementwise: Elementwise
    eager_attention: EagerAttention
    fused_attention: FusedAttention
    optimizer_step: OptimizerStep
    communication: Communication
    overhead: Overhead


# -- quality.json ---------------------------------------------------------------------------------
class Tier(_Rules):
    tier: int = Field(ge=0)
    evidence: str


class Weighing(_Rules):
    balanced_penalty_per_tier: float = Field(ge=0)
    about: str


class Quality(_Rules):
    """catalogs/quality.json: a tier and its evidence per task and method ('full', or 'lora'/'qlora' with
    '/all-linear' or '/subset' for which layers the adapters cover)."""

    schema_: int = Field(alias="schema")
    about: str
    tasks: dict[str, dict[str, Tier]]
    weighing: Weighing

    def tier(self, task: str, method: str, all_linear: bool) -> tuple[str, Tier]:
        """The row (its key, and tier with evidence) that judges `method` on `task`."""
        key = method if method == "full" else f"{method}/{'all-linear' if all_linear else 'subset'}"
        return key, self.tasks[task][key]


# -- planning.json --------------------------------------------------------------------------------
class SearchGrid(_Rules):
    micro_batches: list[int] = Field(min_length=1)
    instance_counts: list[int] = Field(min_length=1)
    source: str


class DatasetRules(_Rules):
    chars_per_token: float = Field(gt=0)
    source: str
    default_eos_tokens: dict[str, str] = Field(default_factory=dict, description="tokenizer_class -> the "
                                               "eos_token transformers gives it when its files name none")
    default_eos_source: str = ""


class Recipes(_Rules):
    learning_rate: dict[str, float]
    max_grad_norm: dict[str, float]
    source: str


class MultiInstance(_Rules):
    margin: float = Field(ge=0, lt=1)
    source: str


class Planning(_Rules):
    """catalogs/planning.json: recommend's search grid, the recipe hyperparameters, the multi-instance
    margin and the dataset approximation."""

    schema_: int = Field(alias="schema")
    search: SearchGrid
    dataset: DatasetRules
    recipes: Recipes
    multi_instance: MultiInstance


# -- time_validation.json -------------------------------------------------------------------------
class ValidatedRun(_Rules):
    """One published run the time model was checked against (ratio = predicted / measured step time)."""

    id: str
    source: str = Field(description="short name of the source, e.g. 'Qwen README'")
    source_title: str
    model: str
    params: int = Field(gt=0)
    method: str
    gpu: str
    gpu_architecture: str
    gpus: int = Field(ge=1)
    tokens_per_micro_batch: float = Field(gt=0, description="per GPU, padding included")
    seq_len: float = Field(gt=0, description="tokens per sequence, padding included")
    split: Literal["train", "held-out", "fresh-1", "fresh-2", "fresh-3", "fresh-4"] = Field(
        description="train (the constants were fitted on it), held-out (never fitted), or a fresh block (collected "
                    "after a model was fixed, blind to its predictions; fresh-1 has been fitted since)")
    predicted_seconds: float = Field(gt=0)
    measured_seconds: float = Field(gt=0)
    ratio: float = Field(gt=0)


class SplitSummary(_Rules):
    n: int = Field(ge=0)
    median_factor: float | None = Field(description="exp of the median |ln ratio|")
    within_1_25: int = Field(ge=0)
    min_ratio: float | None
    max_ratio: float | None


class SmallModels(_Rules):
    max_params: int = Field(gt=0, description="models this size or smaller get the caveat")
    about: str
    source: str


class LongContext(_Rules):
    min_seq_len: int = Field(gt=0, description="plans with sequences this long or longer get the caveat")
    about: str
    source: str


class TimeValidation(_Rules):
    """catalogs/time_validation.json, written by benchmarks/time_accuracy.py: the time model against
    published runs, per run and per split."""

    schema_: int = Field(alias="schema")
    date: str
    about: str
    source: str
    runs: list[ValidatedRun]
    summary: dict[str, SplitSummary]
    small_models: SmallModels
    long_context: LongContext
