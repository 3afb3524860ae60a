"""`ftplan run`: check an accepted plan against a backend, run it, and compare what was measured
with what was planned (recorded as calibration for later estimates)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ftplan.data import calibration as calib
from ftplan.data.files import atomic_write_text, check_writable
from ftplan.errors import PlannerError
from ftplan.plan import Plan, config_hash, load, to_yaml, weights_source
from ftplan.run import registry as plugins
from ftplan.run.backend import BackendOptions, ProgressCallback, RunRequest, RunResult
from pydantic import BaseModel, Field

# What a run writes; --force clears exactly these, never anything else in the directory.
MANAGED = ("adapter", "model", "tokenizer", "metrics.jsonl", "summary.json", "plan.yaml", "accelerate_config.yaml",
           "launch.sh", ".request.json", ".result.json")


class RunSummary(BaseModel):
    """summary.json: the run's result against the plan's estimates."""

    schema_version: int = 1
    backend: str
    plan: Plan
    result: RunResult
    estimated_peak_allocated_bytes: int
    estimated_tokens_per_second_per_gpu: float
    memory_error_percent: float | None = Field(description="(estimated - measured) / measured x 100; CUDA runs only")
    throughput_ratio: float | None = Field(description="measured / estimated tokens per second per GPU; CUDA only")
    calibration: calib.Calibration | None = None


def _managed(output: Path) -> list[Path]:
    return [p for p in output.iterdir() if p.name in MANAGED or p.name.startswith(("checkpoint-", ".checkpoint-"))]


def check_output_dir(output: Path, *, resume: bool, force: bool) -> None:
    """A new run needs an empty (or absent) directory we can write; --resume needs one with a checkpoint."""
    if output.exists() and not output.is_dir():
        raise PlannerError(f"--output {output} is a file; give a directory")
    check_writable(output, f"--output {output}")
    if resume:
        if not output.is_dir() or not any(p.name.startswith("checkpoint-") for p in output.iterdir()):
            raise PlannerError(f"--resume: {output} has no checkpoint; run without --resume to start")
        return
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise PlannerError(f"--output {output} is not empty; pass --force to replace a previous run there, "
                               "--resume to continue it, or choose another directory")
        others = [p.name for p in output.iterdir() if p not in _managed(output)]
        if others:
            raise PlannerError(f"--force: {output} holds files ftplan did not write ({', '.join(sorted(others)[:3])});"
                               " choose another directory")
        for p in _managed(output):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_model(plan: Plan, source: str | None) -> None:
    """The weights must be the architecture the plan was made for (compared by config hash)."""
    if source is None:
        return
    from ftplan.model.resolve import resolve_model

    path = Path(source).expanduser()
    if not path.exists() and plan.model.local_dir is None and source == plan.model.hf_id:
        return  # a Hub id the plan was made from: its config hash is already the plan's
    spec = resolve_model(str(path) if path.exists() else source)
    if config_hash(spec) != plan.model.config_sha256:
        raise PlannerError(f"the model at {source} is not the architecture the plan was made for "
                           f"({plan.model.name}, {plan.model.model_type}); re-plan with: ftplan recommend {source}")


def prepare(plan_path: Path, request: RunRequest, *, backend_name: str | None, raw_options: dict,
            force: bool) -> tuple[Plan, object, BackendOptions]:
    """Load and validate everything before a single file is written."""
    plan = load(plan_path)
    backend = plugins.get_backend(backend_name or plan.backend)
    options = backend.parse_options(raw_options)
    from ftplan.data.dataset import check_training_data

    for path in (request.data, request.eval_data):
        if path is not None:
            check_training_data(path)
    if not request.dry_run:  # a dry run writes nothing, so where it would write does not matter yet
        check_output_dir(request.output_dir, resume=request.resume, force=force)
    problems = backend.check(plan, request, options)
    if problems:
        raise PlannerError(f"backend '{backend.name}' cannot run {plan_path}: " + "; ".join(map(str, problems)))
    check_model(plan, weights_source(plan, request.model_path))
    return plan, backend, options


def execute(plan: Plan, backend, options: BackendOptions, request: RunRequest,
            progress: ProgressCallback) -> RunSummary:
    """Run the plan; write plan.yaml and summary.json beside the backend's outputs; record calibration."""
    request.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(request.output_dir / "plan.yaml", to_yaml(plan))
    result = backend.run(plan, request, options, progress)
    summary = summarize(plan, backend.name, result)
    atomic_write_text(request.output_dir / "summary.json", summary.model_dump_json(indent=2))
    return summary


def summarize(plan: Plan, backend: str, result: RunResult) -> RunSummary:
    """Measured against estimated; on a catalogued CUDA GPU the throughput becomes a calibration."""
    gpus = plan.hardware.instance_count * plan.hardware.gpus_per_instance
    est_tps = plan.estimates.tokens_per_second / gpus
    est_peak = plan.estimates.peak_allocated_bytes
    memory_error = ratio = None
    entry = None
    if result.device == "cuda" and result.peak_memory_bytes:
        memory_error = 100 * (est_peak - result.peak_memory_bytes) / result.peak_memory_bytes
        ratio = result.tokens_per_second / est_tps if est_tps else None
        gpu = calib.gpu_for_device(result.gpu_name or "", plan.estimates.gpu_memory_bytes)
        if gpu is not None and ratio and not result.interrupted:
            # time is inversely proportional to utilisation: scale the planned one by what was measured
            utilization = min(1.0, plan.estimates.utilization * ratio)
            entry = calib.Calibration(gpu=gpu.name, model=plan.model.name, method=plan.training.method,
                                            utilization=utilization, tokens_per_second=result.tokens_per_second,
                                            peak_memory_bytes=result.peak_memory_bytes,
                                            source=f"ftplan run {result.output_dir}", date=calib.today())
            calib.record(entry)
    return RunSummary(backend=backend, plan=plan, result=result, estimated_peak_allocated_bytes=est_peak,
                      estimated_tokens_per_second_per_gpu=est_tps, memory_error_percent=memory_error,
                      throughput_ratio=ratio, calibration=entry)
