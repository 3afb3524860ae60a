"""The contract between `ftplan run` and a trainer backend, and what crosses it.

A backend subclasses `TrainerBackend`, declares what it supports, lists what stops it from running
a plan (`check`), and runs it (`run`), reporting progress through a callback. Options specific to
a backend are a pydantic model, validated before `check` sees them. ftplan itself enforces the
rest of the contract for every backend (ftplan/run/execute.py): it writes plan.yaml,
metrics.jsonl (from the progress events) and summary.json, validates the RunResult, keeps every
artifact inside the output directory, turns a backend's exception into one line, and delivers
SIGTERM as KeyboardInterrupt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftplan.errors import PlannerError
from ftplan.estimate.settings import METHODS
from ftplan.plan import Plan

ANY_PLATFORM = "any"  # a backend that trains on the machine it runs on carries plans made for any platform

__all__ = ["ANY_PLATFORM", "BackendOptions", "Problem", "ProgressCallback", "ProgressEvent", "RunRequest", "RunResult",
           "TrainerBackend"]


class BackendOptions(BaseModel):
    """Backend-specific options (`ftplan run --option KEY=VALUE`); subclass to add fields, each with a
    description: `ftplan plugins` lists them with their types and defaults."""

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
    max_steps: int | None = Field(None, gt=0, le=10**9, description="stop after N optimizer steps")
    save_every: int = Field(100, gt=0, description="optimizer steps between checkpoints")
    log_every: int = Field(1, gt=0)
    resume: bool = False
    resume_step: int | None = Field(None, description="with resume: the step of the checkpoint the backend "
                                                      "reported (TrainerBackend.checkpoint_step)")
    trust_remote_code: bool = False
    device: str = "auto"
    here: bool = Field(False, description="train on this machine even where the plan's hardware differs")
    dry_run: bool = Field(False, description="describe what would be started, start nothing")


class ProgressEvent(BaseModel):
    """One logging step, as shown in the progress display and written to metrics.jsonl by ftplan."""

    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    epoch: float
    loss: float
    learning_rate: float
    tokens: int = Field(ge=0, description="tokens trained on so far (padding excluded)")
    tokens_per_second: float = Field(ge=0)
    elapsed_seconds: float = Field(ge=0)
    eta_seconds: float = Field(ge=0)
    peak_memory_bytes: int | None
    eval_loss: float | None = None


class RunResult(BaseModel):
    """What a finished (or interrupted) run produced and measured."""

    output_dir: Path
    artifacts: list[str] = Field(description="paths, relative to output_dir, of what the backend wrote")
    steps: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None = None
    tokens: int = Field(ge=0, description="tokens trained on (padding excluded)")
    seconds: float = Field(ge=0)
    tokens_per_second: float = Field(ge=0)
    peak_memory_bytes: int | None = Field(description="CUDA: max_memory_allocated; None on the CPU")
    peak_rss_bytes: int | None = Field(None, description="process peak resident memory (CPU runs)")
    device: str
    gpu_name: str | None = None
    interrupted: bool = False
    resumed_from_step: int | None = None
    billed_usd: float | None = Field(None, description="what the run cost, where the backend knows it")
    wall_clock_seconds: float | None = Field(None, ge=0, description="from launch to the end, provisioning and setup "
                                                                      "included, where the backend knows it")
    notes: list[str] = []


ProgressCallback = Callable[[ProgressEvent], None]


class TrainerBackend(ABC):
    """A way to carry out a plan. Subclasses set the class attributes and implement check and run."""

    name: ClassVar[str]
    description: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = METHODS
    platforms: ClassVar[tuple[str, ...]] = ("ec2",)
    options_model: ClassVar[type[BackendOptions]] = BackendOptions
    # Names (fnmatch patterns) this backend writes in the output directory, crash leftovers included,
    # e.g. ("checkpoint-*", ".checkpoint-*.tmp"): `--force` may remove them, as it removes what the
    # manifest lists. Everything else there is the user's and makes --force refuse.
    owned_patterns: ClassVar[tuple[str, ...]] = ()

    def declaration_problem(self) -> str:
        """'' when the class attributes make sense, else what is wrong (checked at registration)."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            return (f"backend '{self.name}' declares methods {list(self.methods)}; ftplan plans "
                    f"{', '.join(METHODS)}")
        if not self.platforms or not all(isinstance(p, str) and p for p in self.platforms):
            return f"backend '{self.name}' declares no platforms"
        if not (isinstance(self.options_model, type) and issubclass(self.options_model, BackendOptions)):
            return f"backend '{self.name}': options_model must subclass BackendOptions"
        return ""

    def option_fields(self) -> list[dict[str, Any]]:
        """Each `--option` key with its type, default and description (for `ftplan plugins`)."""
        rows = []
        for key, info in self.options_model.model_fields.items():
            annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            rows.append({"key": key, "type": annotation, "default": default, "required": info.is_required(),
                         "description": info.description or ""})
        return rows

    def parse_options(self, raw: dict[str, Any]) -> BackendOptions:
        """Validate `--option KEY=VALUE` pairs against `options_model`; PlannerError naming the backend
        and its valid keys otherwise."""
        try:
            return self.options_model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first.get("loc", ())) or "?"
            keys = ", ".join(f"{f['key']} ({f['type']})" for f in self.option_fields()) or "none"
            what = "is not an option" if first.get("type") == "extra_forbidden" else first.get("msg", "is invalid")
            raise PlannerError(f"--option {key}: {what} of backend '{self.name}' (its options: {keys}); see "
                               "ftplan plugins") from None

    def supports(self, plan: Plan) -> list[Problem]:
        """The method and platform checks every backend shares."""
        problems = []
        if plan.training.method not in self.methods:
            problems.append(Problem(message=f"backend '{self.name}' does not train {plan.training.method} (it "
                                            f"supports {', '.join(self.methods)})",
                                    fix="re-plan with ftplan recommend --backend " + self.name
                                        + " or choose another --backend"))
        if plan.hardware.platform not in self.platforms and ANY_PLATFORM not in self.platforms:
            problems.append(Problem(message=f"backend '{self.name}' does not run on {plan.hardware.platform} (it "
                                            f"runs on {', '.join(self.platforms)})",
                                    fix=f"re-plan with ftplan recommend --backend {self.name}, or choose a backend "
                                        "for that platform with --backend (see ftplan plugins)"))
        return problems

    @abstractmethod
    def check(self, plan: Plan, request: RunRequest, options: BackendOptions) -> list[Problem]:
        """Everything that stops this backend from running `plan` here and now; [] when it can.
        Implementations should start from `self.supports(plan)`."""

    def notices(self, plan: Plan, request: RunRequest, options: BackendOptions) -> list[str]:
        """What `ftplan run` should say before the run starts (it goes on): e.g. that a GPU plan trains on this
        machine's CPU. Asked after `check` passed; a backend records them in its RunResult's notes too."""
        return []

    def checkpoint_step(self, request: RunRequest, options: BackendOptions) -> int | None:
        """The optimizer step of the newest intact checkpoint `run` would resume from (asked for
        `--resume`), or None when there is none. Backends that cannot resume keep the default."""
        return None

    def dry_run(self, plan: Plan, request: RunRequest, options: BackendOptions) -> dict:
        """The exact request(s) `run` would send, as a JSON-able dict; nothing is sent or written.
        Backends without a remote side need not implement it."""
        raise NotImplementedError

    @abstractmethod
    def run(self, plan: Plan, request: RunRequest, options: BackendOptions, progress: ProgressCallback) -> RunResult:
        """Carry out `plan`, writing into `request.output_dir`; call `progress` once per logging step.
        Must checkpoint every `request.save_every` steps, resume from `request.resume_step` when
        `request.resume`, and on KeyboardInterrupt (Ctrl-C, or SIGTERM, which ftplan delivers as one)
        save a checkpoint and return a result with `interrupted=True`."""
