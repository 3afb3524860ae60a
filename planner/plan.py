"""The accepted plan: a versioned file that says what to train, where, and what it should cost.

Written by `ftplan recommend` when the user accepts, read by `ftplan plan show` and `ftplan run`.
Hand edits are welcome but validated: unknown keys, wrong types and another schema version are
refused with the key named.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ftplan import __version__
from ftplan.data import catalog
from ftplan.data.files import atomic_write_text
from ftplan.errors import PlannerError
from ftplan.estimate.cost import HourlyPrice, Market, Platform
from ftplan.estimate.settings import Method, TrainingSetup
from ftplan.estimate.sharding import Sharding
from ftplan.estimate.timing import StepTime
from ftplan.model.spec import ModelSpec
from ftplan.names import Name
from ftplan.recommend.models import Assumption

PLAN_SCHEMA_VERSION = 3
DEFAULT_PLAN = Path("ftplan-plan.yaml")
# Bounds past which a value is a typo, not a plan: they keep step counts and seeds within what runs
MAX_EPOCHS = 1000
MAX_LEARNING_RATE = 1.0
MAX_OPTIMIZER_STEPS = 10**9

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanModel(_Strict):
    name: str
    hf_id: str | None
    model_type: str
    source: str
    local_dir: str | None = Field(None, description="directory of the local config.json (and weights), if any")
    config_sha256: str = Field(description="sha256 of the architecture the plan was made for (model_type and "
                                           "the dimensions ftplan reads from config.json)")


class PlanTraining(_Strict):
    method: Method
    setup: TrainingSetup = Field(description="micro-batch, sequence length, precision, optimizer, checkpointing, "
                                             "attention, LoRA and quantization settings")
    targets: str | list[str] | None = Field(description="LoraConfig.target_modules (None: full fine-tuning)")
    global_batch: int = Field(gt=0, le=10**7)
    grad_accum: int = Field(gt=0, le=10**7)
    epochs: float = Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)
    optimizer_steps: int = Field(gt=0, le=MAX_OPTIMIZER_STEPS)
    learning_rate: float = Field(gt=0, allow_inf_nan=False)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False)
    seed: int = Field(42, ge=0, lt=2**32, description="torch, numpy and random take seeds below 2**32")
    packing: bool
    data_source: str
    data_tokens: int = Field(ge=0)

    @field_validator("learning_rate")
    @classmethod
    def _sane_learning_rate(cls, value: float) -> float:
        if value > MAX_LEARNING_RATE:
            raise ValueError(f"{value:g} is beyond any learning rate that trains (at most {MAX_LEARNING_RATE:g}; "
                             "2e-4 is usual for LoRA, 2e-5 for full fine-tuning)")
        return value

    @model_validator(mode="after")
    def _one_method(self) -> "PlanTraining":
        """The method is written twice (training.method, training.setup.method): the run follows the setup, so
        they must agree, and adapters need targets."""
        if self.method != self.setup.method:
            raise ValueError(f"training.method is {self.method} but training.setup.method is {self.setup.method}; "
                             "make them the same")
        if self.method == "full" and self.targets is not None:
            raise ValueError("training.targets must be null for full fine-tuning (every weight trains)")
        if self.method != "full" and not self.targets:
            raise ValueError(f"training.targets is empty; {self.method} needs the modules that get adapters")
        return self


class PlanHardware(_Strict):
    instance_type: str
    instance_count: int = Field(gt=0)
    gpus_per_instance: int = Field(gt=0)
    sharding: Sharding = Field("none", description="how the GPUs share the model (recommend picks none, ddp or "
                                                   "fsdp; zero1-3 run on DeepSpeed when edited in)")
    gpu: str
    platform: Platform
    region: str
    market: Market


class PlanEstimates(_Strict):
    required_bytes_per_gpu: int
    peak_allocated_bytes: int = Field(description="what torch.cuda.max_memory_allocated() should read")
    gpu_memory_bytes: int
    hours: float
    train_hours: float
    cost_usd: float
    price: HourlyPrice
    tokens_per_second: float = Field(description="all GPUs, padding included")
    data_tokens_per_second: float | None = Field(None, description="all GPUs, the data's own tokens (what "
                                                                    "`ftplan run` counts)")
    utilization: float
    utilization_source: str
    time: StepTime | None = Field(None, description="one optimizer step on one GPU, term by term (absent in plans "
                                                    "written by ftplan 0.1)")
    assumptions: list[Assumption]


class Plan(_Strict):
    """An accepted plan (schema_version 2)."""

    schema_version: Literal[3] = PLAN_SCHEMA_VERSION
    ftplan_version: str = __version__
    created_at: str
    task: str
    priority: str
    backend: Name = "hf"
    model: PlanModel
    training: PlanTraining
    hardware: PlanHardware
    estimates: PlanEstimates

    @model_validator(mode="after")
    def _global_batch_adds_up(self) -> "Plan":
        """global_batch = micro-batch x grad_accum x GPUs: the run takes the three, so the total must be theirs."""
        t, hw = self.training, self.hardware
        gpus = hw.instance_count * hw.gpus_per_instance
        if t.global_batch != t.setup.batch_size * t.grad_accum * gpus:
            raise ValueError(f"training.global_batch is {t.global_batch} but micro-batch {t.setup.batch_size} x "
                             f"grad_accum {t.grad_accum} x {gpus} GPU(s) = {t.setup.batch_size * t.grad_accum * gpus}; "
                             "make them agree")
        return self


def install_extras(plan: Plan) -> tuple[str, ...]:
    """The pip extras of ftplan that training the plan needs: train, and deepspeed for a ZeRO plan (the hf backend
    runs it under DeepSpeed)."""
    return ("train", "deepspeed") if plan.hardware.sharding.startswith("zero") else ("train",)


def weights_source(plan: Plan, model_path: str | None = None) -> str | None:
    """Where a run takes the weights from: --model-path, else the plan's local directory, else its HF id."""
    return model_path or plan.model.local_dir or plan.model.hf_id


def config_hash(spec: ModelSpec) -> str:
    """A stable hash of what a plan depends on in a model's config: its type and dimensions.
    Keys that do not change the architecture (dtype, _name_or_path, transformers_version) do not count."""
    shape = {"model_type": spec.model_type, **spec.dims.model_dump()}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_targets(plan: Plan, spec: ModelSpec) -> None:
    """training.targets must name modules of this model and be what training.setup.lora.targets makes the run
    adapt (the run follows the setup): otherwise a hand edit would silently train something else."""
    t = plan.training
    if t.method == "full" or t.setup.lora is None:
        return
    from ftplan.estimate.params import adapted_groups, folds_parameters, resolve_targets
    from ftplan.model.inventory import layout_for

    layout = layout_for(spec)[0]
    resolved = []
    for key, requested in (("training.targets", [t.targets] if isinstance(t.targets, str) else t.targets),
                           ("training.setup.lora.targets", t.setup.lora.targets)):
        try:
            resolved.append(resolve_targets(layout, requested))
        except PlannerError as exc:
            raise PlannerError(f"plan: {key}{str(exc).removeprefix('--lora-targets')}; fix the plan or write a new "
                               "one with ftplan recommend") from None
    planned, trained = ({g.path for g in adapted_groups(layout, r)} for r in resolved)
    if planned != trained:
        raise PlannerError(f"plan: training.targets ({resolved[0].peft_value()}) adapt other modules than "
                           f"training.setup.lora.targets ({resolved[1].peft_value()}), which the run trains; make "
                           "them the same")
    if t.setup.lora.dropout > 0 and folds_parameters(layout, t.setup.lora):
        raise PlannerError(f"plan: training.setup.lora.dropout is {t.setup.lora.dropout:g}, but PEFT adapts this "
                           "model's fused MoE parameters through its ParamWrapper, which takes no dropout; set it "
                           "to 0")


def platform_type(instance_type: str, platform: str) -> str:
    """The name the platform itself uses: SageMaker calls g5.2xlarge ml.g5.2xlarge."""
    return f"ml.{instance_type}" if platform == "sagemaker" and not instance_type.startswith("ml.") else instance_type


def plan_from(spec: ModelSpec, rec, *, backend: str = "hf", seed: int = 42,
              learning_rate: float | None = None) -> Plan:
    """The plan for the recommended candidate of `rec` (a recommend.Recommendation)."""
    c, req = rec.recommended, rec.request
    recipes = catalog.planning().recipes  # the Hugging Face recipe hyperparameters per method
    return Plan(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), task=req.task, priority=req.priority,
        backend=backend,
        model=PlanModel(name=spec.name, hf_id=spec.hf_id, model_type=spec.model_type, source=spec.source,
                        local_dir=spec.local_dir, config_sha256=config_hash(spec)),
        training=PlanTraining(
            method=c.method, setup=c.setup, targets=c.target_modules, global_batch=req.global_batch,
            grad_accum=c.grad_accum, epochs=req.epochs, optimizer_steps=c.optimizer_steps,
            learning_rate=learning_rate or recipes.learning_rate[c.method],
            max_grad_norm=recipes.max_grad_norm[c.method], seed=seed, packing=rec.data.packing, data_source=rec.data.source,
            data_tokens=rec.data.tokens),
        hardware=PlanHardware(instance_type=platform_type(c.instance_type, req.platform),
                              instance_count=c.instance_count,
                              gpus_per_instance=c.gpus_total // c.instance_count, sharding=c.sharding, gpu=c.gpu,
                              platform=req.platform,
                              region=req.region, market=req.market),
        estimates=PlanEstimates(required_bytes_per_gpu=c.required_bytes, peak_allocated_bytes=c.peak_allocated_bytes,
                                gpu_memory_bytes=c.gpu_memory_bytes,
                                hours=c.hours, train_hours=c.train_hours, cost_usd=c.cost_usd, price=c.price,
                                tokens_per_second=c.tokens_per_second,
                                data_tokens_per_second=c.data_tokens_per_second, utilization=c.utilization,
                                utilization_source=c.utilization_source, time=c.time,
                                assumptions=rec.assumptions),
    )


def to_yaml(plan: Plan) -> str:
    import yaml

    header = f"# ftplan plan (schema {PLAN_SCHEMA_VERSION}); show it with: ftplan plan show; run it with: ftplan run\n"
    return header + yaml.safe_dump(plan.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def save(plan: Plan, path: Path, *, overwrite: bool = False) -> None:
    """Write `plan` atomically; an existing file is replaced only with `overwrite`."""
    atomic_write_text(path, to_yaml(plan), overwrite=overwrite)


def load(path: Path) -> Plan:
    """Read and validate a plan file; PlannerError naming the file and the offending key otherwise."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlannerError(f"plan file {path} does not exist; write one with: ftplan recommend MODEL --tokens N") \
            from None
    except IsADirectoryError:
        raise PlannerError(f"plan file {path} is a directory; pass the .yaml file") from None
    except UnicodeDecodeError:
        raise PlannerError(f"plan file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise PlannerError(f"cannot read plan file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise PlannerError(f"plan file {path}{where}: not valid YAML; fix it or write a new plan with ftplan "
                           "recommend") from None
    if not isinstance(data, dict):
        raise PlannerError(f"plan file {path} does not hold a plan (expected a mapping of keys)")
    version = data.get("schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise PlannerError(f"plan file {path} has schema_version {version!r}; this ftplan ({__version__}) reads "
                           f"version {PLAN_SCHEMA_VERSION}: write a new plan with ftplan recommend")
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise PlannerError(f"plan file {path}: " + (f"{key}: " if key else "")
                           + f"{first['msg'].removeprefix('Value error, ')}; fix the key or write a new plan with "
                             "ftplan recommend") from None
