"""What `recommend` takes and returns. Explanations are data - a code and its figures - that the render
layer words; the JSON carries figures, not prose."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, Field

from ftplan.data.dataset import TokenBudget
from ftplan.estimate.cost import HourlyPrice, Market, Platform
from ftplan.estimate.published import PublishedMemoryCheck
from ftplan.estimate.settings import Method, TrainingSetup
from ftplan.estimate.timing import StepTime
from ftplan.recommend.evidence import TimeEvidence

Priority = Literal["cost", "balanced", "quality"]
Task = Literal["instruction", "domain-adaptation", "continued-pretraining"]
Figure = Union[int, float, str, bool, None]
SCHEMA_VERSION = 2


class SearchRequest(BaseModel):
    """What the user asked `recommend` for. None means 'search it'."""

    epochs: float = Field(1.0, gt=0, le=1000, allow_inf_nan=False, description="passes over the data")
    global_batch: int = Field(16, gt=0, description="sequences per optimizer step, across all GPUs")
    budget_usd: float | None = Field(None, gt=0, allow_inf_nan=False)
    deadline_hours: float | None = Field(None, gt=0, allow_inf_nan=False)
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
    """One way to train: a setting on N instances, with its memory, time, cost and quality tier."""

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
    hours: float = Field(description="billed wall-clock hours per instance, setup included")
    train_hours: float
    setup_hours: float = Field(description="billed per instance outside training: setup, and the cluster's "
                                           "launch for several instances")
    cost_usd: float = Field(description="every instance's billed hours x its hourly price")
    price: HourlyPrice
    tokens_per_second: float = Field(description="all GPUs together, padding included")
    data_tokens_per_second: float = Field(description="all GPUs together, the data's own tokens (padding excluded)")
    utilization: float = Field(description="achieved share of the dense peak over a whole optimizer step")
    utilization_source: str = Field(description="where the utilisation ceiling u_max comes from")
    time: StepTime = Field(description="one optimizer step on one GPU, term by term")
    optimizer_steps: int
    quality_tier: int = Field(description="0 is the best the literature reached for the task; each judgement "
                                          "recommend makes about quality is this tier")
    quality_basis: str = Field(description="the quality.json row judged: 'full', or 'lora'/'qlora' with "
                                           "'/all-linear' or '/subset' (adapters on some linear layers only)")
    quality_evidence: str = Field(description="the published finding behind the tier, for exactly this basis")

    @property
    def label(self) -> str:
        return f"{self.method} on {self.instance_count} x {self.instance_type}"


class Reason(BaseModel):
    """Why the recommended plan was chosen: a code and its figures."""

    code: Literal["priority", "headroom", "budget", "deadline", "quality", "single_instance_kept",
                  "multi_instance_wins"]
    figures: dict[str, Figure]


class WhyNot(BaseModel):
    """Why another method's best plan lost, or why that method has none."""

    method: Method
    code: Literal["ranked_lower", "misses_limits", "needs_more_memory", "needs_more_gpus", "unsupported",
                  "no_instance", "all_linear_not_searched"]
    figures: dict[str, Figure]


class Assumption(BaseModel):
    """A modelling choice behind the times and prices."""

    code: Literal["data", "time_model", "dequantization", "host_ram", "parallelism", "setup", "global_batch",
                  "quality_weighing", "multi_instance_margin", "spot", "stale_price"]
    figures: dict[str, Figure]


class Recommendation(BaseModel):
    """What `ftplan recommend --json` prints."""

    schema_version: int = SCHEMA_VERSION
    model: str
    data: TokenBudget
    request: SearchRequest
    recommended: Candidate
    best_single_instance: Candidate | None = Field(description="the best plan on one instance, shown beside a "
                                                               "multi-instance recommendation (and equal to it "
                                                               "otherwise)")
    candidates: list[Candidate] = Field(description="the best plans in ranking order (the recommended first)")
    frontier: list[Candidate] = Field(description="cost-versus-time Pareto frontier, fastest first")
    reasons: list[Reason]
    evaluated: int = Field(description="setting x instance type x instance count combinations examined")
    kept: int = Field(description="combinations that fit and meet every limit (evaluated = kept + dropped)")
    rejections: dict[str, int] = Field(description="combinations dropped, by reason code")
    why_not: list[WhyNot]
    assumptions: list[Assumption]
    time_evidence: TimeEvidence | None = Field(None, description="how far the time model was off on the "
                                                                 "published runs nearest the recommended plan")
    memory_evidence: PublishedMemoryCheck | None = Field(None, description="published GPU runs of the recommended "
                                                                           "plan's method and sharding against the "
                                                                           "memory model")
    required_at_published_high_bytes: int | None = Field(None, description="per GPU, what the recommended plan needs "
                                                                           "if its allocated peak is the highest "
                                                                           "published ratio times the estimate")
    backend: str | None = Field(None, description="the trainer backend the plan names")
    backend_reason: Literal["requested", "platform", "skypilot", "hf_without_skypilot", "plugin_platform"] | None = \
        Field(None, description="why that backend: --backend, the platform's own (sagemaker), skypilot installed "
                                "for EC2, hf because skypilot is not installed, or the plugin backend for its platform")
