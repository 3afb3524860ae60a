"""`ftplan run`: check an accepted plan against a backend, run it, and hold every backend to the contract.

Whatever the backend, ftplan itself: validates the plan, data, options and output directory before
anything is written; locks the output directory; writes plan.yaml, metrics.jsonl (from the progress
events; on --resume the lines after the checkpoint are dropped, a torn last line too) and
summary.json; delivers SIGTERM to the backend as KeyboardInterrupt; turns a backend's exception
into one line; validates the RunResult, with every artifact inside --output; and records what was
written in the manifest, so a later --force may replace it.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from ftplan.data import calibration as calib
from ftplan.data.dataset import check_training_data
from ftplan.data.files import atomic_write_text
from ftplan.errors import PlannerError
from ftplan.estimate.timing import calibrated_u_max, solved_constants
from ftplan.plan import Plan, check_targets, config_hash, load, to_yaml, weights_source
from ftplan.run import output, registry
from ftplan.run.backend import BackendOptions, ProgressCallback, ProgressEvent, RunRequest, RunResult, TrainerBackend
from ftplan.run.datanotes import data_notes

METRICS = "metrics.jsonl"


class RunSummary(BaseModel):
    """summary.json: the run's result against the plan's estimates."""

    schema_version: int = 1
    backend: str
    plan: Plan
    result: RunResult
    estimated_peak_allocated_bytes: int
    estimated_tokens_per_second_per_gpu: float = Field(description="the data's own tokens (padding excluded)")
    memory_error_percent: float | None = Field(description="(estimated - measured) / measured x 100; CUDA runs only")
    throughput_ratio: float | None = Field(description="measured / estimated tokens per second per GPU; CUDA only")
    estimated_hours: float | None = Field(None, description="the plan's billed hours, to compare with the result's "
                                                            "wall-clock")
    estimated_cost_usd: float | None = Field(None, description="the plan's cost, to compare with billed_usd")
    calibration: calib.Calibration | None = None


def check_model(plan: Plan, source: str | None) -> None:
    """The weights must be the architecture the plan was made for (compared by config hash), and the plan's
    LoRA targets modules of it."""
    if source is None:
        return
    from ftplan.model.resolve import resolve_model

    path = Path(source).expanduser()
    if not path.exists() and plan.model.local_dir is None and source == plan.model.hf_id:
        return  # a Hub id the plan was made from: its config hash is already the plan's (the backend checks targets)
    spec = resolve_model(str(path) if path.exists() else source)
    if config_hash(spec) != plan.model.config_sha256:
        raise PlannerError(f"the model at {source} is not the architecture the plan was made for "
                           f"({plan.model.name}, {plan.model.model_type}); re-plan with: ftplan recommend {source}")
    check_targets(plan, spec)


def _failure(backend: TrainerBackend, what: str, exc: Exception) -> PlannerError:
    """One line for a backend's exception (the traceback stays available with --debug)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return PlannerError(f"backend '{backend.name}' failed in {what}: {type(exc).__name__}"
                        + (f": {message}" if message else ""))


def _backend_call(backend: TrainerBackend, what: str, call):
    """Call into a backend; its exceptions (other than PlannerError) become one PlannerError line."""
    try:
        return call()
    except PlannerError:
        raise
    except Exception as exc:
        raise _failure(backend, what, exc) from exc


def prepare(plan_path: Path, request: RunRequest, *, backend_name: str | None, raw_options: dict,
            force: bool) -> tuple[Plan, TrainerBackend, BackendOptions]:
    """Load and validate everything before a single file is written."""
    plan = load(plan_path)
    backend = registry.get_backend(backend_name or plan.backend)
    options = backend.parse_options(raw_options)
    if not request.dry_run and request.output_dir.is_dir() and not request.output_dir.is_symlink():
        output.refuse_busy(request.output_dir)  # first: a running run's checkpoints are not ours to read or remove
    for path in (request.data, request.eval_data):
        if path is not None:
            check_training_data(path)
    if request.resume:
        step = _backend_call(backend, "checkpoint_step", lambda: backend.checkpoint_step(request, options))
        if step is None:
            raise PlannerError(f"--resume: backend '{backend.name}' has no checkpoint in {request.output_dir}; run "
                               "without --resume to start")
        request.resume_step = step
    doomed: list[Path] = []
    if not request.dry_run:  # a dry run writes nothing, so where it would write does not matter yet
        doomed = output.check_output_dir(request.output_dir, resume=request.resume, force=force,
                                         patterns=backend.owned_patterns)
    problems = _backend_call(backend, "check", lambda: backend.check(plan, request, options))
    if problems:
        raise PlannerError(f"backend '{backend.name}' cannot run {plan_path}: " + "; ".join(map(str, problems)))
    check_model(plan, weights_source(plan, request.model_path))
    output.empty(request.output_dir, doomed)  # last: input refused above leaves the previous run in place
    return plan, backend, options


def describe(plan: Plan, backend: TrainerBackend, options: BackendOptions, request: RunRequest) -> dict:
    """The backend's dry run: what it would start, as data; nothing is sent or written."""
    try:
        return backend.dry_run(plan, request, options)
    except NotImplementedError:
        raise PlannerError(f"backend '{backend.name}' has no dry run (it runs here); drop --dry-run") from None
    except PlannerError:
        raise
    except Exception as exc:
        raise _failure(backend, "dry_run", exc) from exc


def notices(plan: Plan, backend: TrainerBackend, options: BackendOptions, request: RunRequest) -> list[str]:
    """What the backend says before the run starts (warnings; the run goes on)."""
    said = _backend_call(backend, "notices", lambda: backend.notices(plan, request, options))
    return [str(line) for line in said or []]


class MetricsLog:
    """metrics.jsonl, one ProgressEvent per line, appended and flushed as events arrive. Opened once, without
    following a link: a link planted during the run cannot redirect the appends."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = read_metrics(path) if resume_step is not None else []
        kept = [e for e in kept if e.step <= resume_step] if resume_step is not None else []
        atomic_write_text(path, "".join(e.model_dump_json() + "\n" for e in kept))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))
        self.events = kept

    def append(self, event: ProgressEvent) -> None:
        os.write(self._fd, (event.model_dump_json() + "\n").encode("utf-8"))
        self.events.append(event)

    def close(self) -> None:
        os.close(self._fd)


def read_metrics(path: Path) -> list[ProgressEvent]:
    """The events of a metrics.jsonl; a line that does not parse (a kill mid-append) and all after it are
    dropped."""
    events = []
    if path.is_symlink():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    for line in lines:
        if not line.strip():
            continue
        try:
            events.append(ProgressEvent.model_validate_json(line))
        except ValueError:
            break
    return events


@contextmanager
def sigterm_as_interrupt():
    """Deliver SIGTERM as KeyboardInterrupt (what Ctrl-C raises), so every backend stops the same way.
    A backend that installs its own handlers while it runs (the hf backend does) takes precedence."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_result(request: RunRequest, events: list[ProgressEvent]) -> RunResult:
    """What an interrupted backend that let KeyboardInterrupt escape has done, from its progress events."""
    last = events[-1] if events else None
    return RunResult(output_dir=request.output_dir, artifacts=[], steps=last.step if last else 0,
                     total_steps=last.total_steps if last else 0, first_loss=events[0].loss if events else None,
                     final_loss=last.loss if last else None, tokens=last.tokens if last else 0,
                     seconds=last.elapsed_seconds if last else 0.0,
                     tokens_per_second=last.tokens_per_second if last else 0.0,
                     peak_memory_bytes=last.peak_memory_bytes if last else None, device="unknown",
                     interrupted=True, notes=["interrupted; the backend returned no result"])


def validate_result(backend: TrainerBackend, result, out: Path) -> RunResult:
    """The backend's RunResult, checked: the right type, and every artifact a path inside `out`."""
    try:
        result = RunResult.model_validate(result if not isinstance(result, BaseModel) else result.model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlannerError(f"backend '{backend.name}' returned an invalid result "
                           f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
    for name in result.artifacts:
        try:
            output.inside(out, name)
        except PlannerError as exc:
            raise PlannerError(f"backend '{backend.name}' reported an artifact outside --output: {exc}") from None
    return result


def execute(plan: Plan, backend: TrainerBackend, options: BackendOptions, request: RunRequest,
            progress: ProgressCallback) -> RunSummary:
    """Run the plan under the contract; returns the summary written to summary.json. A fresh run that fails or
    is interrupted before its first step leaves --output as it found it (the next run needs no --force)."""
    out = request.output_dir
    made = [] if out.exists() else [out, *(p for p in out.absolute().parents if not p.exists())]
    before = set() if made else {p.name for p in out.iterdir()}
    try:
        with output.lock(out):
            return _execute_locked(plan, backend, options, request, progress, before)
    finally:
        for directory in made:  # the directories this run created, innermost first, while they are empty
            if not directory.is_dir() or any(directory.iterdir()):
                break
            directory.rmdir()


def _execute_locked(plan: Plan, backend: TrainerBackend, options: BackendOptions, request: RunRequest,
                    progress: ProgressCallback, before: set[str]) -> RunSummary:
    out, fresh = request.output_dir, not request.resume
    atomic_write_text(out / "plan.yaml", to_yaml(plan))
    output.record(out, ["plan.yaml", METRICS])
    metrics = MetricsLog(out / METRICS, request.resume_step if request.resume else None)

    def on_event(event: ProgressEvent) -> None:
        metrics.append(event)
        progress(event)

    try:
        with sigterm_as_interrupt():
            result = backend.run(plan, request, options, on_event)
    except KeyboardInterrupt:
        if fresh and not metrics.events:  # stopped before a step: nothing to resume, so nothing to keep
            output.remove_new(out, before, backend.owned_patterns)
            raise
        result = _interrupted_result(request, metrics.events)
    except Exception as exc:
        if fresh and not metrics.events:  # nothing happened: leave the directory as it was
            output.remove_new(out, before, backend.owned_patterns)
        if isinstance(exc, PlannerError):
            raise
        raise _failure(backend, "run", exc) from exc
    finally:
        metrics.close()
    result = validate_result(backend, result, out)
    # what was said about the data at the start, kept with the figures it qualifies
    result.notes = [*(n for n in data_notes(plan, request) if n not in result.notes), *result.notes]
    output.record(out, [*result.artifacts, "summary.json"])
    summary = summarize(plan, backend.name, result)
    atomic_write_text(out / "summary.json", summary.model_dump_json(indent=2))
    return summary


def summarize(plan: Plan, backend: str, result: RunResult) -> RunSummary:
    """Measured against estimated; on a catalogued CUDA GPU the throughput becomes a calibration."""
    gpus = plan.hardware.instance_count * plan.hardware.gpus_per_instance
    # the backend counts the data's own tokens over every GPU; plans from ftplan 0.1 carry padded tokens only
    est_tps = (plan.estimates.data_tokens_per_second or plan.estimates.tokens_per_second) / gpus
    est_peak = plan.estimates.peak_allocated_bytes
    memory_error = ratio = None
    entry = None
    if result.device == "cuda" and result.peak_memory_bytes:
        memory_error = 100 * (est_peak - result.peak_memory_bytes) / result.peak_memory_bytes
        ratio = result.tokens_per_second / gpus / est_tps if est_tps else None
        gpu = calib.gpu_for_device(result.gpu_name or "", plan.estimates.gpu_memory_bytes)
        if gpu is not None and ratio and not result.interrupted:
            entry = _calibration(plan, gpu.name, ratio, result)
            calib.record(entry)
    return RunSummary(backend=backend, plan=plan, result=result, estimated_peak_allocated_bytes=est_peak,
                      estimated_tokens_per_second_per_gpu=est_tps, memory_error_percent=memory_error,
                      throughput_ratio=ratio, calibration=entry, estimated_hours=plan.estimates.hours,
                      estimated_cost_usd=plan.estimates.cost_usd)


def _calibration(plan: Plan, gpu: str, ratio: float, result: RunResult) -> calib.Calibration:
    """What the run measured, as a calibration: utilisation scales with throughput, and the time model's
    ceiling is the one under which the planned step takes the measured time."""
    step = plan.estimates.time
    u_max = calibrated_u_max(step, step.seconds / ratio) if step else None
    return calib.Calibration(gpu=gpu, model=plan.model.name, method=plan.training.method,
                             utilization=min(1.0, plan.estimates.utilization * ratio), u_max=u_max,
                             tokens_per_micro_batch=step.tokens_per_micro_batch if step else None,
                             tokens_per_second=result.tokens_per_second, peak_memory_bytes=result.peak_memory_bytes,
                             source=f"ftplan run {result.output_dir}", date=calib.today(),
                             attention=plan.training.setup.attention, **solved_constants(step))
