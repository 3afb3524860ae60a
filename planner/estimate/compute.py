"""Training FLOPs: what one GPU computes per token, and the dense peak it computes them against.

FLOPs are counted term by term (matmuls, attention scores, LoRA adapters, recomputation), so a
measured step time pins down one number - the utilisation of those FLOPs - which ftplan.estimate.timing
turns into seconds.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate.params import ParamCounts, adapted_groups, lora_params
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import MATMUL_KINDS, PARAMETER_KINDS, ModelLayout, ModuleGroup


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

    @property
    def attention_total(self) -> float:
        """Attention's score FLOPs in the whole step: forward, backward (twice the forward), recomputation."""
        return self.attention_forward * (3.0 + (1.0 if self.recompute else 0.0))

    def weighted(self, attention_ratio: float) -> float:
        """FLOPs per token counted at the matmuls' rate: attention's run `attention_ratio` times as fast."""
        return self.total + self.attention_total * (1.0 / attention_ratio - 1.0)


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
    head = layout.head_numel()
    attention = 2.0 * d.layers * context * d.q_dim
    adapter = 0.0
    if counts.targets:
        adapter = sum(_adapter_forward(layout, g, setup) for g in adapted_groups(layout, counts.targets))
    forward = 2.0 * matmul + attention + adapter
    weight_grads = 2.0 * matmul if setup.method == "full" else 0.0
    if counts.targets and setup.method != "full":
        # PEFT's ParamWrapper folds the adapter into the weight, so backward computes the whole weight's gradient
        weight_grads = 2.0 * sum(g.weight_numel * layout.instances(g) * active_fraction(layout, g.kind)
                                 for g in adapted_groups(layout, counts.targets) if g.kind in PARAMETER_KINDS)
    backward = 2.0 * matmul + weight_grads + 2.0 * attention + 2.0 * adapter
    recompute = (forward - 2.0 * head) if setup.grad_ckpt else 0.0
    return FlopsPerToken(forward=forward, backward=backward, recompute=recompute,
                         attention_forward=attention, adapter_forward=adapter)


def _adapter_forward(layout: ModelLayout, g: ModuleGroup, setup: TrainingSetup) -> float:
    """Forward FLOPs per token of one adapted module type: x @ A @ B per token, or, for a parameter PEFT's
    ParamWrapper folds (MoE router, fused experts), the low-rank product once per micro-batch (baddbmm over the
    experts, each of rank r x lora_rank_factor / experts) shared by its tokens."""
    if g.kind not in PARAMETER_KINDS:
        return 2.0 * lora_params(g, setup.lora.r) * layout.instances(g) * active_fraction(layout, g.kind)
    rank = setup.lora.r * g.lora_rank_factor / (layout.dims.experts if g.kind == "experts" else 1)
    return 2.0 * g.weight_numel * rank * layout.instances(g) / setup.tokens


def fp32_expert_share(layout: ModelLayout, setup: TrainingSetup, param_sharded: bool = False) -> float:
    """Share of the per-token matmul FLOPs in fused MoE experts that compute in fp32 while the rest of the step
    runs in half precision: QLoRA's upcast experts and full -mixed's fp32 masters (transformers' grouped_mm
    ignores autocast), unless parameter sharding gathers them in bf16 (`param_sharded`). The time model counts
    them at the half-precision rate; this says how much that covers."""
    fp32_experts = setup.method == "qlora" or (setup.method == "full" and setup.precision.endswith("-mixed"))
    if not layout.dims.experts or not fp32_experts or setup.precision == "fp32" or param_sharded:
        return 0.0
    active = [(g.kind, g.weight_numel * layout.instances(g) * active_fraction(layout, g.kind))
              for g in layout.modules if g.kind in MATMUL_KINDS]
    return sum(n for kind, n in active if kind == "experts") / sum(n for _, n in active)


def peak_flops(gpu: catalog.Gpu, setup: TrainingSetup) -> float:
    """Dense peak in the setup's matmul dtype: the tensor cores' bf16/fp16; for fp32, TF32's tensor cores where
    the setup turns TF32 on and the GPU has it, else the CUDA cores' fp32 (1/16 of fp16 where not catalogued)."""
    if setup.precision.startswith("bf16"):
        return (gpu.bf16_tflops or gpu.fp16_tflops) * 1e12
    if setup.precision.startswith("fp16"):
        return gpu.fp16_tflops * 1e12
    if setup.tf32 and gpu.tf32_tflops:
        return gpu.tf32_tflops * 1e12
    return (gpu.fp32_tflops or gpu.fp16_tflops / 16) * 1e12
