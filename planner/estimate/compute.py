"""Training FLOPs and step time: what one GPU computes per token, and how fast it gets through it.

FLOPs are counted term by term (matmuls, attention scores, LoRA adapters, recomputation), so a
measured step time pins down one number - the utilisation of those FLOPs - which a calibration
file can then supply instead of the catalogued default.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate.params import ParamCounts, adapted_groups, lora_params
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import MATMUL_KINDS, QUANTIZED_KINDS, ModelLayout


class FlopsPerToken(BaseModel):
    """Training FLOPs per token, by pass."""

    forward: float
    backward: float
    recompute: float = Field(description="gradient checkpointing re-runs each layer's forward in backward")
    attention_forward: float = Field(description="QK^T and AV per token (part of forward), causal")
    adapter_forward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


class StepTime(BaseModel):
    """Time of one micro-batch on one GPU."""

    flops_per_token: FlopsPerToken
    peak_flops: float = Field(description="dense peak of the GPU in the setup's precision, FLOP/s")
    utilization: float
    utilization_source: str
    compute_seconds: float
    dequant_seconds: float = Field(description="QLoRA: dequantizing the 4-bit weights, memory-bound")
    tokens: int = Field(description="tokens in the micro-batch")

    @property
    def seconds(self) -> float:
        return self.compute_seconds + self.dequant_seconds


def active_fraction(layout: ModelLayout, kind: str) -> float:
    """Share of a kind's weights each token passes through: top-k of the experts for MoE."""
    d = layout.dims
    return d.experts_per_token / d.experts if kind == "experts" and d.experts else 1.0


def flops_per_token(layout: ModelLayout, setup: TrainingSetup, counts: ParamCounts, context: float) -> FlopsPerToken:
    """Forward, backward and recomputation FLOPs per token at mean context length `context`.

    A matmul costs 2 FLOPs per weight per token forward; backward costs the same again for the
    input gradient, and again for the weight gradient where the weight trains (full fine-tuning).
    Frozen weights (LoRA, QLoRA) still pass the activation gradient back. Attention scores and
    the weighted sum cost 2 x layers x context x q_dim per token (causal: half the square).
    """
    d = layout.dims
    matmul = sum(g.weight_numel * layout.instances(g) * active_fraction(layout, g.kind)
                 for g in layout.modules if g.kind in MATMUL_KINDS)
    head = sum(g.weight_numel for g in layout.modules if g.kind == "head")
    attention = 2.0 * d.layers * context * d.q_dim
    adapter = 0.0
    if counts.targets:
        adapter = 2.0 * sum(lora_params(g, setup.lora.r) * layout.instances(g) * active_fraction(layout, g.kind)
                            for g in adapted_groups(layout, counts.targets))
    forward = 2.0 * matmul + attention + adapter
    weight_grads = 2.0 * matmul if setup.method == "full" else 0.0
    backward = 2.0 * matmul + weight_grads + 2.0 * attention + 2.0 * adapter
    recompute = (forward - 2.0 * head) if setup.grad_ckpt else 0.0
    return FlopsPerToken(forward=forward, backward=backward, recompute=recompute,
                         attention_forward=attention, adapter_forward=adapter)


def peak_flops(gpu: catalog.Gpu, setup: TrainingSetup) -> float:
    """Dense tensor-core peak in the setup's compute dtype (fp32 without TF32: 1/16 of fp16)."""
    if setup.precision.startswith("bf16"):
        return (gpu.bf16_tflops or gpu.fp16_tflops) * 1e12
    if setup.precision.startswith("fp16"):
        return gpu.fp16_tflops * 1e12
    return gpu.fp16_tflops * 1e12 / 16


def default_utilization(gpu: catalog.Gpu, method: str) -> tuple[float, str]:
    """The catalogued utilisation for the GPU's architecture and the method, with its source."""
    rules = catalog.throughput().utilization
    for row in rules.defaults:
        if row.architecture == gpu.architecture:
            return row.for_method(method), f"default for {gpu.architecture} ({row.source})"
    return rules.fallback, rules.fallback_source


def dequant_seconds(layout: ModelLayout, setup: TrainingSetup, gpu: catalog.Gpu) -> float:
    """QLoRA: one dequantization of every 4-bit weight per pass (forward, backward, recompute)."""
    if setup.method != "qlora":
        return 0.0
    rules = catalog.throughput().dequantization
    weights = sum(g.weight_numel * layout.instances(g) for g in layout.modules if g.kind in QUANTIZED_KINDS)
    passes = 3 if setup.grad_ckpt else 2
    bandwidth = gpu.memory_bandwidth_gbps * 1e9 * rules.bandwidth_efficiency
    return passes * weights * rules.bytes_per_weight / bandwidth


def step_time(layout: ModelLayout, setup: TrainingSetup, counts: ParamCounts, gpu: catalog.Gpu, *,
              micro_batch: int, tokens_per_sequence: float, utilization: tuple[float, str] | None = None) -> StepTime:
    """Seconds for one micro-batch of `micro_batch` sequences of mean length `tokens_per_sequence`."""
    flops = flops_per_token(layout, setup, counts, tokens_per_sequence)
    util, source = utilization or default_utilization(gpu, setup.method)
    peak = peak_flops(gpu, setup)
    tokens = micro_batch * tokens_per_sequence
    return StepTime(flops_per_token=flops, peak_flops=peak, utilization=util, utilization_source=source,
                    compute_seconds=flops.total * tokens / (peak * util),
                    dequant_seconds=dequant_seconds(layout, setup, gpu), tokens=round(tokens))


def network_gbytes_per_s(network: str) -> float:
    """An EC2 network performance string ('4x100 Gb', 'up to 25 Gb', '3200 Gb') in GB/s."""
    m = re.search(r"(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*Gb", network)
    if not m:
        return catalog.throughput().communication.network_floor_gbytes_per_s
    return (int(m.group(1) or 1) * float(m.group(2))) / 8


def intra_node_gbytes_per_s(instance: catalog.Instance) -> float:
    """Bus bandwidth per GPU between the GPUs of one instance: NVLink/NVSwitch when it has them, else PCIe."""
    comm = catalog.throughput().communication
    speeds = comm.intra_node_gbytes_per_s
    linked = any(k in instance.interconnect for k in ("NVLink", "NVSwitch"))
    return speeds.get(instance.gpu.split("-")[0] if linked else "PCIe", speeds["PCIe"]) * comm.bus_efficiency


def inter_node_gbytes_per_s(instance: catalog.Instance) -> float:
    """Bus bandwidth of one instance's network to the others (half of it without EFA)."""
    comm = catalog.throughput().communication
    efa = 1.0 if instance.efa else comm.inter_node_without_efa_factor
    return network_gbytes_per_s(instance.network) * efa * comm.bus_efficiency


def allreduce_seconds(gradient_bytes: int, instance: catalog.Instance, count: int) -> float:
    """Ring all-reduce of the gradients once per optimizer step, inside and across instances."""
    gpus = instance.gpu_count
    seconds = 0.0
    if gpus > 1:
        seconds += 2 * (gpus - 1) / gpus * gradient_bytes / (intra_node_gbytes_per_s(instance) * 1e9)
    if count > 1:
        seconds += 2 * (count - 1) / count * gradient_bytes / (inter_node_gbytes_per_s(instance) * 1e9)
    return seconds


def gather_seconds(total_bytes: float, instance: catalog.Instance, count: int) -> float:
    """All-gathering `total_bytes` of sharded parameters onto every GPU: each GPU receives (N-1)/N of
    them, over the slowest link in the job (the instance network, shared by its GPUs, when there are
    several instances)."""
    gpus = instance.gpu_count * count
    if gpus == 1:
        return 0.0
    per_gpu = inter_node_gbytes_per_s(instance) / instance.gpu_count if count > 1 else \
        intra_node_gbytes_per_s(instance)
    return (gpus - 1) / gpus * total_bytes / (per_gpu * 1e9)
