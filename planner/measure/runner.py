"""`ftplan measure`: run real training steps on random tokens and compare memory with the estimate.

The model is built by ftplan.train.build, the code the Hugging Face backend trains with. On CUDA the peak is
`torch.cuda.max_memory_allocated()` after a warm-up step. On the CPU three independent instruments measure it
(measure/instruments.py): the live-tensor tracker, the c10 allocator through the profiler, and the resident
set of a child process; they are reported side by side, a disagreement over 2% is flagged, and the estimate
is compared with RSS.
"""

from __future__ import annotations

import contextlib
import time

from pydantic import BaseModel, Field

from ftplan.estimate.memory import MemoryBreakdown
from ftplan.estimate.report import ModelInfo, estimate
from ftplan.estimate.settings import Method, SetupChoices, TrainingSetup
from ftplan.measure.session import nbytes
from ftplan.model.spec import ModelSpec


class MeasuredMemory(BaseModel):
    """What the steps allocated, in bytes, and how fast they ran."""

    peak_allocated_bytes: int = Field(description="the reference peak: RSS where it was measured, else the "
                                                  "allocator's (CPU), else max_memory_allocated (CUDA)")
    peak_tracker_bytes: int | None = Field(None, description="CPU: live tensor storages (dispatch-level tracker)")
    peak_allocator_bytes: int | None = Field(None, description="CPU: every block of the c10 allocator (profiler)")
    peak_rss_bytes: int | None = Field(None, description="CPU: resident set of a child process (VmHWM)")
    allocator_peak_at: str = Field("", description="the op path of the allocation that reached the peak")
    allocator_live_by_op: dict[str, int] = Field({}, description="bytes allocated during the measured steps and "
                                                                 "live at the allocator's peak, by op")
    instruments_disagree_percent: float | None = Field(
        None, description="(largest - smallest) / smallest x 100 over the CPU instruments; flagged above 2")
    resident_bytes: int = Field(description="held between steps: weights, buffers, quantization state, "
                                            "optimizer states, a custom loop's kept outputs")
    weights_bytes: int = Field(description="parameters, buffers and quantization state")
    optimizer_bytes: int
    gradients_bytes: int = Field(description="gradients alive at the end of backward")
    activations_bytes: int = Field(description="allocated at the end of forward beyond the resident bytes")
    step_seconds: float
    tokens_per_second: float
    loss: float


class MeasureReport(BaseModel):
    """What `ftplan measure --json` prints."""

    model: ModelInfo
    setup: TrainingSetup
    device: str
    steps: int
    grad_accum: int = Field(1, description="micro-batches per measured optimizer step")
    estimated: MemoryBreakdown
    estimated_compared_bytes: int = Field(description="the estimate compared with the measured peak: "
                                                      "peak_allocated_bytes, plus paged optimizer states on "
                                                      "the CPU (which has no paged memory)")
    measured: MeasuredMemory
    error_percent: float = Field(description="(estimated - measured) / measured x 100")
    gpu: str | None = Field(None, description="the catalogued GPU measured on (cuda only)")
    utilization: float | None = Field(None, description="measured utilisation of the FLOPs ftplan counts (cuda)")
    predicted_tokens_per_second: float | None = Field(None, description="the time model's throughput for this "
                                                                        "step on the GPU (cuda)")
    calibration_file: str | None = Field(None, description="where the utilisation was recorded, if it was")


DISAGREEMENT_FLAG = 2.0  # percent


class _CpuMeter:
    """Live tensor bytes on the CPU, counted by the tracker while the steps run."""

    def __init__(self, session) -> None:
        from ftplan.measure.memtrack import LiveBytes

        self.tracker = LiveBytes()
        for tensor in session.resident_tensors():
            self.tracker.track(tensor)
        self.tracker.reset_peak()

    def current(self) -> int:
        return self.tracker.current

    def peak(self) -> int:
        return self.tracker.peak

    def session(self):
        return self.tracker


class _CudaMeter:
    """The CUDA caching allocator's own counters."""

    def __init__(self, session) -> None:
        import torch

        self.cuda = torch.cuda
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        return self.cuda.memory_allocated()

    def peak(self) -> int:
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated()

    def session(self):
        return contextlib.nullcontext()


def _run(session, steps: int) -> MeasuredMemory:
    from ftplan.measure.memtrack import resident_tensors, tensors_of

    meter = (_CudaMeter if session.device == "cuda" else _CpuMeter)(session)
    resident = meter.current()
    weights = nbytes(resident_tensors(session.model))
    optimizer_bytes = nbytes(tensors_of(session.optimizer.state))
    marks: dict[str, int] = {}
    start = time.perf_counter()
    with meter.session():
        for _ in range(steps):
            loss = session.step(on_forward_end=lambda: marks.__setitem__("forward", meter.current()),
                                on_backward_end=lambda: marks.__setitem__("grads", _grad_bytes(session.model)))
    peak = meter.peak()
    elapsed = (time.perf_counter() - start) / steps
    return MeasuredMemory(peak_allocated_bytes=peak, peak_tracker_bytes=peak if session.device == "cpu" else None,
                          resident_bytes=resident, weights_bytes=weights, optimizer_bytes=optimizer_bytes,
                          gradients_bytes=marks["grads"], activations_bytes=marks["forward"] - resident,
                          step_seconds=elapsed, tokens_per_second=session.setup.tokens * session.micro_steps / elapsed,
                          loss=loss)


def _grad_bytes(model) -> int:
    return nbytes(p.grad for p in model.parameters() if p.grad is not None)


def _cpu_instruments(measured: MeasuredMemory, session, spec: ModelSpec, seed: int, rss: bool) -> None:
    """Add the allocator and RSS instruments' peaks; the reference becomes RSS where measured, else the
    allocator's; flag instruments that disagree by more than 2%."""
    from ftplan.measure import instruments

    measured.peak_allocator_bytes, measured.allocator_peak_at, measured.allocator_live_by_op = \
        instruments.allocator_peak(session)
    if rss and instruments.rss_supported():
        child = instruments.rss_in_child({"config": spec.config, "name": spec.name, "seed": seed,
                                          "micro_steps": session.micro_steps,
                                          "setup": session.setup.model_dump(mode="json")})
        measured.peak_rss_bytes = child["resident_bytes"] + child["extra_bytes"]
    peaks = [p for p in (measured.peak_tracker_bytes, measured.peak_allocator_bytes, measured.peak_rss_bytes) if p]
    measured.instruments_disagree_percent = 100 * (max(peaks) - min(peaks)) / min(peaks)
    measured.peak_allocated_bytes = measured.peak_rss_bytes or measured.peak_allocator_bytes


def measure(spec: ModelSpec, method: Method, choices: SetupChoices, *, steps: int = 1, device: str = "cpu",
            seed: int = 0, calibrate: bool = False, rss: bool = True, grad_accum: int = 1) -> MeasureReport:
    """Build `spec` for `method`, run one warm-up and `steps` measured steps (each over `grad_accum`
    micro-batches), compare with the estimate.

    On the CPU three instruments measure the peak (tracker, allocator, and with `rss` the resident set of a
    child process); the estimate is compared with RSS (else the allocator). On CUDA the measured throughput
    gives the utilisation of the counted FLOPs; with `calibrate` it is recorded in the calibration file, where
    recommend's time estimates pick it up.
    """
    import torch

    from ftplan.errors import PlannerError
    from ftplan.measure.session import prepare

    for flag, value in (("--steps", steps), ("--grad-accum", grad_accum)):
        if value <= 0:
            raise PlannerError(f"{flag} must be positive, got {value}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PlannerError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    gpu_bf16 = device != "cuda" or torch.cuda.is_bf16_supported()
    report = estimate(spec, [method], choices, device=device, grad_accum=grad_accum)
    setup = report.estimates[0].setup
    if not gpu_bf16 and setup.precision.startswith("bf16"):
        raise PlannerError("this GPU has no bf16: pass --precision fp16-mixed")
    session = prepare(spec, setup, device, seed, micro_steps=grad_accum)
    measured = _run(session, steps)
    if device == "cpu":
        _cpu_instruments(measured, session, spec, seed, rss)
    memory = report.estimates[0].memory
    compared = memory.peak_allocated_bytes + (memory.paged_optimizer_bytes if device == "cpu" else 0)
    result = MeasureReport(model=report.model, setup=setup, device=device, steps=steps, grad_accum=grad_accum,
                           estimated=memory,
                           estimated_compared_bytes=compared, measured=measured,
                           error_percent=100 * (compared - measured.peak_allocated_bytes)
                           / measured.peak_allocated_bytes)
    if device == "cuda":
        _add_utilization(result, spec, setup, calibrate)
    return result


def throughput_figures(step, measured_tokens_per_second: float) -> tuple[float, float, float]:
    """For a measured optimizer step of `step`'s shape (a StepTime, accumulation included): the utilisation of the
    FLOPs ftplan counts, the time model's tokens/s, and the u_max under which the model takes the measured time."""
    from ftplan.estimate.timing import calibrated_u_max

    tokens_per_step = step.tokens_per_micro_batch * step.grad_accum
    utilization = step.flops_per_token.total * measured_tokens_per_second / step.peak_flops
    return (utilization, tokens_per_step / step.seconds,
            calibrated_u_max(step, tokens_per_step / measured_tokens_per_second))


def _add_utilization(result: MeasureReport, spec: ModelSpec, setup: TrainingSetup, calibrate: bool) -> None:
    import torch

    from ftplan.data import calibration
    from ftplan.estimate.params import count_params
    from ftplan.estimate.timing import solved_constants, step_time
    from ftplan.model.inventory import layout_for

    props = torch.cuda.get_device_properties(0)
    gpu = calibration.gpu_for_device(props.name, props.total_memory)
    if gpu is None:
        return
    layout, _ = layout_for(spec)
    step = step_time(layout, setup, count_params(layout, setup.method, setup.lora), gpu, result.estimated,
                     tokens_per_sequence=setup.seq_len, accum=result.grad_accum)
    measured = result.measured.tokens_per_second
    result.gpu = gpu.name
    result.utilization, result.predicted_tokens_per_second, u_max = throughput_figures(step, measured)
    if calibrate and 0 < result.utilization <= 1:
        path = calibration.record(calibration.Calibration(
            gpu=gpu.name, model=spec.name, method=setup.method, utilization=result.utilization, u_max=u_max,
            tokens_per_micro_batch=step.tokens_per_micro_batch, tokens_per_second=measured,
            peak_memory_bytes=result.measured.peak_allocated_bytes, source="ftplan measure",
            date=calibration.today(), attention=setup.attention,
            **solved_constants(step)))  # the time model u_max was solved in
        result.calibration_file = str(path)
