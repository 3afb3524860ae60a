"""`ftplan measure`: run real training steps on random tokens and compare memory with the estimate.

The model is built by planner.modelbuild, the same code the Hugging Face backend uses. On CUDA
the peak is `torch.cuda.max_memory_allocated()` after a warm-up step; on the CPU it is the
high-water mark of live tensor storage (planner.memtrack), which counts the same thing.
"""

from __future__ import annotations

import contextlib
import time

from pydantic import BaseModel, Field

from ftplan.estimate.memory import MemoryBreakdown
from ftplan.estimate.report import ModelInfo, estimate
from ftplan.estimate.settings import Method, SetupChoices, TrainingSetup
from ftplan.model.spec import ModelSpec


class MeasuredMemory(BaseModel):
    """What the steps allocated, in bytes, and how fast they ran."""

    peak_allocated_bytes: int
    resident_bytes: int = Field(description="held between steps: weights, buffers, quantization state, "
                                            "optimizer states")
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
    estimated: MemoryBreakdown
    estimated_compared_bytes: int = Field(description="the estimate compared with the measured peak: "
                                                      "peak_allocated_bytes, plus paged optimizer states on "
                                                      "the CPU (which has no paged memory)")
    measured: MeasuredMemory
    error_percent: float = Field(description="(estimated - measured) / measured x 100")
    gpu: str | None = Field(None, description="the catalogued GPU measured on (cuda only)")
    utilization: float | None = Field(None, description="measured utilisation of the FLOPs ftplan counts (cuda)")
    calibration_file: str | None = Field(None, description="where the utilisation was recorded, if it was")


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


class _CpuMeter:
    """Live tensor bytes on the CPU, counted by planner.memtrack while the steps run."""

    def __init__(self, model, optimizer) -> None:
        from ftplan.measure.memtrack import LiveBytes, resident_tensors

        self.tracker = LiveBytes()
        for tensor in resident_tensors(model, optimizer):
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

    def __init__(self, model, optimizer) -> None:
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


def _run(model, optimizer, batch, setup: TrainingSetup, steps: int, device: str) -> MeasuredMemory:
    from ftplan.measure.memtrack import resident_tensors, tensors_of
    from ftplan.train.build import train_step

    meter = (_CudaMeter if device == "cuda" else _CpuMeter)(model, optimizer)
    resident = meter.current()
    weights = _nbytes(resident_tensors(model))
    optimizer_bytes = _nbytes(tensors_of(optimizer.state))
    marks: dict[str, int] = {}
    start = time.perf_counter()
    with meter.session():
        for _ in range(steps):
            loss = train_step(model, optimizer, batch, setup, device,
                              on_forward_end=lambda: marks.__setitem__("forward", meter.current()),
                              on_backward_end=lambda: marks.__setitem__("grads", _grad_bytes(model)))
    peak = meter.peak()
    elapsed = (time.perf_counter() - start) / steps
    return MeasuredMemory(peak_allocated_bytes=peak, resident_bytes=resident, weights_bytes=weights,
                          optimizer_bytes=optimizer_bytes, gradients_bytes=marks["grads"],
                          activations_bytes=marks["forward"] - resident, step_seconds=elapsed,
                          tokens_per_second=setup.tokens / elapsed, loss=loss)


def _grad_bytes(model) -> int:
    return _nbytes(p.grad for p in model.parameters() if p.grad is not None)


def measure(spec: ModelSpec, method: Method, choices: SetupChoices, *, steps: int = 1, device: str = "cpu",
            seed: int = 0, calibrate: bool = False) -> MeasureReport:
    """Build `spec` for `method`, run one warm-up and `steps` measured steps, compare with the estimate.

    On CUDA the measured throughput gives the utilisation of the counted FLOPs; with `calibrate`
    it is recorded in the calibration file, where recommend's time estimates pick it up.
    """
    import torch

    from ftplan.errors import PlannerError
    from ftplan.train.build import build_model, build_optimizer, random_batch, train_step

    if steps <= 0:
        raise PlannerError(f"--steps must be positive, got {steps}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PlannerError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    gpu_bf16 = device != "cuda" or torch.cuda.is_bf16_supported()
    report = estimate(spec, [method], choices, device=device)
    setup = report.estimates[0].setup
    if not gpu_bf16 and setup.precision.startswith("bf16"):
        raise PlannerError("this GPU has no bf16: pass --precision fp16-mixed")
    torch.manual_seed(seed)
    model = build_model(spec, setup, device=device)
    optimizer = build_optimizer(model, setup)
    batch = random_batch(spec.dims.vocab, setup, device)
    train_step(model, optimizer, batch, setup, device)  # warm-up: optimizer states exist from here on
    measured = _run(model, optimizer, batch, setup, steps, device)
    memory = report.estimates[0].memory
    compared = memory.peak_allocated_bytes + (memory.paged_optimizer_bytes if device == "cpu" else 0)
    result = MeasureReport(model=report.model, setup=setup, device=device, steps=steps, estimated=memory,
                           estimated_compared_bytes=compared, measured=measured,
                           error_percent=100 * (compared - measured.peak_allocated_bytes)
                           / measured.peak_allocated_bytes)
    if device == "cuda":
        _add_utilization(result, spec, setup, calibrate)
    return result


def _add_utilization(result: MeasureReport, spec: ModelSpec, setup: TrainingSetup, calibrate: bool) -> None:
    import torch

    from ftplan.data import calibration
    from ftplan.estimate.compute import flops_per_token, peak_flops
    from ftplan.estimate.params import count_params
    from ftplan.model.inventory import layout_for

    props = torch.cuda.get_device_properties(0)
    gpu = calibration.gpu_for_device(props.name, props.total_memory)
    if gpu is None:
        return
    layout, _ = layout_for(spec)
    flops = flops_per_token(layout, setup, count_params(layout, setup.method, setup.lora), setup.seq_len).total
    result.gpu = gpu.name
    result.utilization = calibration.utilization_from(flops, result.measured.tokens_per_second, peak_flops(gpu, setup))
    if calibrate and 0 < result.utilization <= 1:
        path = calibration.record(calibration.Calibration(
            gpu=gpu.name, model=spec.name, method=setup.method, utilization=result.utilization,
            tokens_per_second=result.measured.tokens_per_second,
            peak_memory_bytes=result.measured.peak_allocated_bytes, source="ftplan measure",
            date=calibration.today()))
        result.calibration_file = str(path)
