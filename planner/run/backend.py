"""The contract between `ftplan run` and a trainer backend, and what crosses it.

A backend subclasses `TrainerBackend`, declares what it supports, lists what stops it from running
a plan (`check`), and runs it (`run`), reporting progress through a callback. Options specific to
a backend are a pydantic model, validated before `check` sees them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

from ftplan.plan import Plan
from pydantic import BaseModel, ConfigDict, Field


class BackendOptions(BaseModel):
    """Backend-specific options (`ftplan run --option KEY=VALUE`); subclass to add fields."""

    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """Something that stops a backend from running a plan, and how to fix it."""

    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})"


class RunRequest(BaseModel):
    """Everything a backend needs besides the plan."""

    data: Path = Field(description="training data: JSONL or a Hugging Face datasets directory")
    eval_data: Path | None = None
    output_dir: Path
    model_path: str | None = Field(None, description="local directory or Hugging Face id overriding the plan's")
    max_steps: int | None = Field(None, gt=0)
    save_every: int = Field(100, gt=0, description="optimizer steps between checkpoints")
    log_every: int = Field(1, gt=0)
    resume: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    dry_run: bool = Field(False, description="describe what would be started, start nothing")


class ProgressEvent(BaseModel):
    """One logging step, as shown in the progress display and written to metrics.jsonl."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens: int = Field(description="tokens processed so far, padding included")
    tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float
    peak_memory_bytes: int | None
    eval_loss: float | None = None


class RunResult(BaseModel):
    """What a finished (or interrupted) run produced and measured."""

    output_dir: Path
    artifacts: list[str] = Field(description="paths, relative to output_dir, of what was written")
    steps: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None = None
    tokens: int
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int | None = Field(description="CUDA: max_memory_allocated; None on the CPU")
    peak_rss_bytes: int | None = Field(None, description="process peak resident memory (CPU runs)")
    device: str
    gpu_name: str | None = None
    interrupted: bool = False
    resumed_from_step: int | None = None
    notes: list[str] = []


ProgressCallback = Callable[[ProgressEvent], None]


class TrainerBackend(ABC):
    """A way to carry out a plan. Subclasses set the class attributes and implement check and run."""

    name: ClassVar[str]
    description: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ("full", "lora", "qlora")
    platforms: ClassVar[tuple[str, ...]] = ("ec2",)
    options_model: ClassVar[type[BackendOptions]] = BackendOptions

    def parse_options(self, raw: dict[str, Any]) -> BackendOptions:
        """Validate `--option KEY=VALUE` pairs against `options_model`."""
        return self.options_model.model_validate(raw)

    def supports(self, plan: Plan) -> list[Problem]:
        """The method and platform checks every backend shares."""
        problems = []
        if plan.training.method not in self.methods:
            problems.append(Problem(message=f"backend '{self.name}' does not train {plan.training.method} (it "
                                            f"supports {', '.join(self.methods)})",
                                    fix="re-plan with ftplan recommend --methods " + ",".join(self.methods)
                                        + " or choose another --backend"))
        if plan.hardware.platform not in self.platforms:
            problems.append(Problem(message=f"backend '{self.name}' does not run on {plan.hardware.platform}",
                                    fix="choose a backend for that platform with --backend (see ftplan plugins)"))
        return problems

    @abstractmethod
    def check(self, plan: Plan, request: RunRequest, options: BackendOptions) -> list[Problem]:
        """Everything that stops this backend from running `plan` here and now; [] when it can.
        Implementations should start from `self.supports(plan)`."""

    def dry_run(self, plan: Plan, request: RunRequest, options: BackendOptions) -> dict:
        """The exact request(s) `run` would send, as a JSON-able dict; nothing is sent or written.
        Backends without a remote side need not implement it."""
        raise NotImplementedError

    @abstractmethod
    def run(self, plan: Plan, request: RunRequest, options: BackendOptions, progress: ProgressCallback) -> RunResult:
        """Carry out `plan`, writing into `request.output_dir`; call `progress` once per logging step.
        Must checkpoint every `request.save_every` steps, resume when `request.resume`, and on
        KeyboardInterrupt save a checkpoint and return a result with `interrupted=True`."""
