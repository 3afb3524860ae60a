"""How long one optimizer step takes on one GPU, term by term.

    micro-batch = max(max(compute + elementwise + eager attention + dequantization, launch floor), FSDP gathers)
    compute     = weighted FLOPs per token x (T + t_half) / (peak x u_max),   t_half = kappa x peak / bandwidth
    weighted    = matmul FLOPs + attention FLOPs / r,   r = the attention kernel's throughput over a matmul's
    elementwise = T x bytes_per_hidden x hidden x layers x (passes + 1) / bandwidth
    eager attention (attn_implementation="eager" only) = sequences x heads x S^2 x layers
                  x (forward bytes per score x (1 + recomputation) + backward bytes per score) / bandwidth
    step        = accumulation x micro-batch + optimizer step + exposed gradient all-reduce

T is the tokens of one micro-batch on one GPU, so utilisation u(T) = u_max x T / (T + t_half) rises with
the micro-batch and saturates. The constants and their sources are in catalogs/throughput.json; the form
was fitted to, and is validated against, published runs (benchmarks/TIME-ACCURACY.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate.compute import FlopsPerToken, flops_per_token, peak_flops
from ftplan.estimate.memory import MemoryBreakdown
from ftplan.estimate.network import allreduce_seconds, gather_seconds
from ftplan.estimate.params import ParamCounts
from ftplan.estimate.settings import TrainingSetup
from ftplan.estimate.sharding import PARAM_SHARDED, Sharding
from ftplan.model.layout import QUANTIZED_KINDS, ModelLayout

if TYPE_CHECKING:
    from ftplan.data.calibration import Calibration


class Parallel(BaseModel):
    """How a step is spread: `count` instances, and what each GPU holds (sharding as ftplan.estimate.sharding
    names it: ZeRO-1/2 shard the optimizer states of replicas; FSDP and ZeRO-3 shard the weights too, and
    gather them every micro-batch - PyTorch FSDP prefetches the gathers behind compute, ZeRO-3 waits for them)."""

    instance: catalog.Instance
    count: int = Field(1, ge=1)
    sharding: Sharding = "ddp"

    @property
    def gpus(self) -> int:
        return self.instance.gpu_count * self.count

    @property
    def shards(self) -> int:
        """GPUs the optimizer states are split over."""
        if self.sharding in ("none", "ddp"):
            return 1
        return self.instance.gpu_count if self.sharding == "fsdp-hybrid" else self.gpus


class StepTime(BaseModel):
    """One optimizer step on one GPU. Per-micro-batch terms are seconds of one micro-batch."""

    flops_per_token: FlopsPerToken
    peak_flops: float = Field(description="dense peak of the GPU in the setup's precision, FLOP/s")
    bandwidth_bytes_per_s: float = Field(description="the GPU's peak memory bandwidth")
    u_max: float = Field(description="utilisation ceiling of the counted FLOPs at long micro-batches")
    u_max_source: str
    t_half_tokens: float = Field(description="tokens per micro-batch at which utilisation is half of u_max")
    tokens_per_micro_batch: float = Field(description="tokens of one micro-batch on one GPU, padding included")
    grad_accum: int
    compute_seconds: float = Field(description="per micro-batch: the counted FLOPs at u(T), attention's at its "
                                               "kernel's rate")
    attention_kernel_ratio: float = Field(1.0, description="attention's FLOP rate over the matmuls' (1: eager's "
                                                           "batched matmuls, and plans written before 2026-12-02)")
    elementwise_seconds: float = Field(0.0, description="per micro-batch: memory-bound normalisation, activation "
                                                        "and residual kernels (absent from plans written before "
                                                        "2026-12-01, whose times had no such term)")
    elementwise_bytes_per_hidden: float | None = Field(None, description="the elementwise constant of "
                                                                         "elementwise_seconds (absent before "
                                                                         "2026-12-02: unknown)")
    attention_seconds: float = Field(0.0, description="per micro-batch: eager attention's memory-bound work on its "
                                                      "score matrices (0 with SDPA or FlashAttention, which never "
                                                      "write them; absent from plans written before 2026-12-01)")
    dequant_seconds: float = Field(description="per micro-batch: QLoRA dequantizing its 4-bit weights")
    launch_floor_seconds: float = Field(description="per micro-batch: the least time to launch its kernels")
    gather_seconds: float = Field(description="per micro-batch: FSDP weight gathers (and gradient reduce-scatter "
                                              "for full fine-tuning), hidden behind compute when shorter")
    optimizer_seconds: float = Field(description="per optimizer step: the memory-bound update")
    sync_seconds: float = Field(description="per optimizer step: gradient all-reduce not hidden by backward")

    gathers_hidden: bool = Field(True, description="prefetched gathers overlap compute (PyTorch FSDP), else they "
                                                   "add to it (DeepSpeed ZeRO-3)")

    @property
    def busy_seconds(self) -> float:
        """What the GPU itself spends on one micro-batch."""
        return max(self.kernel_seconds, self.launch_floor_seconds)

    @property
    def kernel_seconds(self) -> float:
        """The GPU's kernels for one micro-batch: matmuls and attention, elementwise work, dequantization."""
        return self.compute_seconds + self.memory_bound_seconds

    @property
    def memory_bound_seconds(self) -> float:
        """The memory-bound kernels of one micro-batch: elementwise, eager attention scores, dequantization."""
        return self.elementwise_seconds + self.attention_seconds + self.dequant_seconds

    @property
    def micro_seconds(self) -> float:
        if self.gathers_hidden:
            return max(self.busy_seconds, self.gather_seconds)
        return self.busy_seconds + self.gather_seconds

    @property
    def seconds(self) -> float:
        """One optimizer step."""
        return self.grad_accum * self.micro_seconds + self.optimizer_seconds + self.sync_seconds

    @property
    def bound(self) -> Literal["compute", "memory", "launch", "communication"]:
        """What sets a micro-batch's time: communication, kernel launches, or the kernels themselves - the
        matmuls and attention (compute) or, when they take longer, the memory-bound kernels (memory):
        elementwise, eager attention's scores, dequantization."""
        if self.gather_seconds > (self.busy_seconds if self.gathers_hidden else 0.0):
            return "communication"
        if self.launch_floor_seconds > self.kernel_seconds:
            return "launch"
        return "memory" if self.memory_bound_seconds > self.compute_seconds else "compute"

    @property
    def utilization(self) -> float:
        """Achieved share of the dense peak, counting ftplan's FLOPs over the whole step."""
        work = self.flops_per_token.total * self.tokens_per_micro_batch * self.grad_accum
        return work / (self.seconds * self.peak_flops)


def t_half_tokens(gpu: catalog.Gpu, peak: float) -> float:
    """Tokens per micro-batch at half the utilisation ceiling: kappa x the roofline ridge point."""
    return catalog.throughput().utilization.kappa * peak / (gpu.memory_bandwidth_gbps * 1e9)


def default_u_max(gpu: catalog.Gpu) -> tuple[float, str]:
    """The catalogued utilisation ceiling for the GPU, with its source."""
    return catalog.throughput().utilization.u_max(gpu.name, gpu.architecture)


def passes(setup: TrainingSetup) -> int:
    """Passes over the weights per micro-batch: forward and backward, and recomputation with checkpointing."""
    return 3 if setup.grad_ckpt else 2


def dequant_seconds(layout: ModelLayout, setup: TrainingSetup, gpu: catalog.Gpu) -> float:
    """QLoRA: one dequantization of every 4-bit weight per pass, memory-bound."""
    if setup.method != "qlora":
        return 0.0
    rules = catalog.throughput().dequantization
    weights = sum(g.weight_numel * layout.instances(g) for g in layout.modules if g.kind in QUANTIZED_KINDS)
    bandwidth = gpu.memory_bandwidth_gbps * 1e9 * rules.bandwidth_efficiency
    return passes(setup) * weights * rules.bytes_per_weight / bandwidth


def elementwise_seconds(layout: ModelLayout, setup: TrainingSetup, gpu: catalog.Gpu, tokens: float) -> float:
    """Memory-bound elementwise kernels of one micro-batch of `tokens`: traffic per token proportional to
    hidden size x layers, once per forward-equivalent pass (the backward counts as two)."""
    per_token = catalog.throughput().elementwise.bytes_per_hidden * layout.dims.hidden * layout.dims.layers
    return tokens * per_token * (passes(setup) + 1) / (gpu.memory_bandwidth_gbps * 1e9)


def eager_attention_seconds(layout: ModelLayout, setup: TrainingSetup, gpu: catalog.Gpu,
                            tokens_per_sequence: float) -> float:
    """Eager attention's memory-bound work on one micro-batch: every score (query head x query x key, causal
    masking still computes the whole square) is scaled, masked, soft-maxed in fp32 and cast back in the forward
    (again in the recomputation) and differentiated in the backward, which moves about as much as one forward.
    SDPA's and FlashAttention's kernels never write the scores: nothing."""
    if setup.attention != "eager":
        return 0.0
    scores = setup.batch_size * layout.dims.heads * tokens_per_sequence ** 2 * layout.dims.layers
    rules = catalog.throughput().eager_attention
    per_score = rules.forward_bytes_per_score * (2 if setup.grad_ckpt else 1) + rules.backward_bytes_per_score
    return scores * per_score / (gpu.memory_bandwidth_gbps * 1e9)


def launch_floor_seconds(layout: ModelLayout, setup: TrainingSetup) -> float:
    """The host's kernel launches for one micro-batch: a fixed cost per decoder layer and pass."""
    return catalog.throughput().launch_floor.seconds_per_layer_pass * layout.dims.layers * passes(setup)


def update_bytes(setup: TrainingSetup, memory: MemoryBreakdown) -> int:
    """What the optimizer step reads and writes: trained weights, their gradients and the optimizer states."""
    trained = memory.weights_bytes if setup.method == "full" else memory.adapter_bytes
    return trained + memory.gradients_bytes + memory.optimizer_bytes + memory.paged_optimizer_bytes


def travelling_weight_bytes(setup: TrainingSetup, memory: MemoryBreakdown) -> int:
    """Weight bytes an FSDP gather moves: 4-bit weights as stored; fp32 ones in bf16/fp16 under a -mixed
    policy (the weights travel in the compute dtype)."""
    weights = memory.weights_bytes + memory.adapter_bytes
    if setup.precision.endswith("-mixed"):
        weights -= (memory.weights_by_dtype.get("fp32", 0) + memory.adapter_bytes) // 2
    return weights


def step_time(layout: ModelLayout, setup: TrainingSetup, counts: ParamCounts, gpu: catalog.Gpu,
              memory: MemoryBreakdown, *, tokens_per_sequence: float, accum: int = 1,
              parallel: Parallel | None = None, u_max: tuple[float, str] | None = None,
              flops: FlopsPerToken | None = None, attention_kernel: str | None = None) -> StepTime:
    """One optimizer step of `accum` micro-batches of `setup.batch_size` sequences of mean length
    `tokens_per_sequence`, on one GPU of `parallel` (one GPU alone when None). `memory` is the single-GPU
    breakdown; `u_max` (with its source) replaces the catalogued ceiling, e.g. from a calibration; `flops`,
    when given, is flops_per_token() of the same arguments (computed once for many instances);
    `attention_kernel` names a catalogued attention kernel in place of the one `setup.attention` runs."""
    flops = flops or flops_per_token(layout, setup, counts, tokens_per_sequence)
    peak = peak_flops(gpu, setup)
    ceiling, source = u_max or default_u_max(gpu)
    t_half = t_half_tokens(gpu, peak)
    tokens = setup.batch_size * tokens_per_sequence
    ratio = catalog.throughput().fused_attention.ratio(attention_kernel or setup.attention, gpu.architecture)
    compute = flops.weighted(ratio) * (tokens + t_half) / (peak * ceiling)
    bandwidth = gpu.memory_bandwidth_gbps * 1e9
    optimizer = catalog.throughput().optimizer_step.passes_per_byte * update_bytes(setup, memory) / bandwidth
    gather = reduce = 0.0
    if parallel is not None and parallel.gpus > 1:
        comm = catalog.throughput().communication
        inst, count = parallel.instance, parallel.count
        optimizer /= parallel.shards  # each GPU steps its shard of the states
        sharded = parallel.sharding in PARAM_SHARDED
        if sharded:
            moved = comm.fsdp_gathers_per_micro_batch * travelling_weight_bytes(setup, memory)
            if setup.method == "full":  # gradients reduce-scattered every micro-batch; FSDP under the Trainer's
                # no_sync only in the last (DeepSpeed reduces every micro-batch whatever the Trainer says)
                no_sync = parallel.sharding.startswith("fsdp") and not setup.sync_each_batch
                moved += memory.gradients_bytes / (accum if no_sync else 1)
            gather = gather_seconds(moved, inst, count)
        if not sharded or setup.method != "full":  # once per optimizer step
            reduce = allreduce_seconds(memory.gradients_bytes, inst, count)
    step = StepTime(flops_per_token=flops, peak_flops=peak, bandwidth_bytes_per_s=bandwidth, u_max=ceiling,
                    u_max_source=source, t_half_tokens=t_half, tokens_per_micro_batch=tokens, grad_accum=accum,
                    compute_seconds=compute, attention_kernel_ratio=ratio,
                    elementwise_seconds=elementwise_seconds(layout, setup, gpu, tokens),
                    elementwise_bytes_per_hidden=catalog.throughput().elementwise.bytes_per_hidden,
                    attention_seconds=eager_attention_seconds(layout, setup, gpu, tokens_per_sequence),
                    dequant_seconds=dequant_seconds(layout, setup, gpu),
                    launch_floor_seconds=launch_floor_seconds(layout, setup), gather_seconds=gather,
                    optimizer_seconds=optimizer, sync_seconds=0.0,
                    gathers_hidden=parallel is None or parallel.sharding != "zero3")
    if not reduce:
        return step
    # the all-reduce overlaps the last micro-batch's backward: all of what the GPU spends on it (busy_seconds)
    hidden = catalog.throughput().communication.allreduce_overlap * step.busy_seconds
    return step.model_copy(update={"sync_seconds": max(0.0, reduce - hidden)})


def solved_constants(step: StepTime | None) -> dict[str, float]:
    """The constants a calibration's u_max is solved in (the fields of ftplan.data.calibration.Calibration), so
    that rebased_u_max can restate it after they change: those of `step` (today's, or for a step computed
    earlier - a plan's - 0 for a term it does not carry, planned before the term existed); none without a step."""
    if step is None:
        return {}
    rules = catalog.throughput()
    # a plan's step says which elementwise constant it was computed with; one from before 2026-12-02 does not
    elementwise = step.elementwise_bytes_per_hidden
    if elementwise is None:
        elementwise = rules.elementwise.bytes_per_hidden if step.elementwise_seconds else 0.0
    return {"elementwise_bytes_per_hidden": elementwise,
            "eager_bytes_per_score": rules.eager_attention.bytes_per_score if step.attention_seconds else 0.0,
            "attention_kernel_ratio": step.attention_kernel_ratio}


def rebased_u_max(step: StepTime, bytes_per_hidden_then: float, bytes_per_score_then: float | None = None,
                  kernel_ratio_then: float | None = None) -> float:
    """A calibrated ceiling that was solved under older constants - the elementwise constant
    `bytes_per_hidden_then`, eager attention's `bytes_per_score_then` (0 before each existed) and the attention
    kernel's ratio to the matmuls `kernel_ratio_then` (1 before it existed); None: as today's - restated for
    today's: the ceiling under which the step takes what it took then. `step` is today's step at the old
    ceiling, so the restatement is made at its shape, not the calibration's; where it would need more than the
    dense peak, or the kernels do not set the step, the ceiling stays."""
    rules = catalog.throughput()
    missing = 0.0
    for seconds, then, now in ((step.elementwise_seconds, bytes_per_hidden_then, rules.elementwise.bytes_per_hidden),
                               (step.attention_seconds, bytes_per_score_then, rules.eager_attention.bytes_per_score)):
        if now and then is not None and then != now:
            missing += step.grad_accum * seconds * (1 - then / now)
    compute = step.grad_accum * step.compute_seconds
    if kernel_ratio_then is not None and kernel_ratio_then != step.attention_kernel_ratio:
        flops = step.flops_per_token  # compute scales with the weighted FLOPs at a given ceiling
        missing += compute * (1 - flops.weighted(kernel_ratio_then) / flops.weighted(step.attention_kernel_ratio))
    if not missing or step.bound not in ("compute", "memory") or missing >= compute * (1 - step.u_max):
        return step.u_max  # no change, the kernels do not set the time, or it would take more than the peak
    return step.u_max * compute / (compute - missing)  # the matmuls give back exactly what the new terms take


def restated_u_max(step: StepTime, calib: Calibration, attention: str, architecture: str) -> float:
    """A calibration's ceiling restated for today's constants (rebased_u_max), with only the constants that
    apply to it: eager attention's where it was measured with eager attention, the attention kernel's ratio where
    it was measured with the kernel `attention` runs on this architecture (sdpa and flash_attention_2 are one
    kernel; a calibration that did not record its attention is taken as the plan's). `step` is today's step, of
    `attention`, at the calibration's ceiling."""
    eager_then = calib.eager_bytes_per_score if calib.attention == "eager" else None
    kernels = catalog.throughput().fused_attention
    same_kernel = kernels.ratio(calib.attention or attention, architecture) == step.attention_kernel_ratio
    return rebased_u_max(step, calib.elementwise_bytes_per_hidden, eager_then,
                         calib.attention_kernel_ratio if same_kernel else None)


def calibrated_u_max(step: StepTime, measured_seconds: float) -> float:
    """The utilisation ceiling under which `step` takes `measured_seconds` per optimizer step.

    When the kernels set the micro-batch time, only the compute term moves with u_max and the other terms
    stay as modelled; otherwise (launch- or communication-bound, or the other terms already exceed the
    measurement) the ceiling scales with the whole step."""
    compute = step.grad_accum * step.compute_seconds
    measured_compute = measured_seconds - (step.seconds - compute)
    if step.bound in ("compute", "memory") and measured_compute > 0.25 * measured_seconds:
        return min(1.0, step.u_max * compute / measured_compute)
    return min(1.0, step.u_max * step.seconds / measured_seconds)
