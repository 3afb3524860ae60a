"""Per-GPU memory of one steady-state training step, itemised.

`peak_allocated_bytes` models what `torch.cuda.max_memory_allocated()` reads after a warm-up
step: live tensor bytes at the step's peak. `required_bytes` adds what the GPU also needs
and the allocator does not count (CUDA context, fragmentation, paged optimizer states) and
is what decides whether a GPU fits.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate import activations as act
from ftplan.estimate import optimizer as opt
from ftplan.estimate.params import ParamCounts, adapted_groups, count_params, lora_params
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import QUANTIZED_KINDS, UNQUANTIZED_MATMUL_KINDS, ModelLayout, ModuleGroup

NF4_BLOCK = 64                 # bitsandbytes 4-bit blocksize
NESTED_BLOCK = 256             # double quantization: one fp32 absmax per 256 absmax bytes
END_OF_FORWARD = "end of forward (activations + logits)"
BACKWARD_START = "backward start (activations + loss gradients)"
END_OF_BACKWARD = "end of backward (all gradients)"
LAST_LAYER = "backward through the last layer"
FIRST_LAYER = "backward through the first layer"
OPTIMIZER_STEP = "optimizer step (gradients + its temporaries)"
HEAD = "backward through the head (its new gradient)"


class MemoryBreakdown(BaseModel):
    """Bytes per GPU, by what holds them. All figures are integer bytes."""

    weights_bytes: int = Field(description="base model weights as stored (quantized ones with their constants)")
    weights_by_dtype: dict[str, int]
    adapter_bytes: int = Field(description="LoRA adapter weights (fp32, as PEFT creates them)")
    gradients_bytes: int
    optimizer_bytes: int = Field(description="optimizer states in the PyTorch allocator")
    paged_optimizer_bytes: int = Field(description="paged optimizer states (CUDA unified memory, can spill to host)")
    optimizer_step_bytes: int = Field(0, description="temporaries the optimizer allocates while it steps")
    logits_kept_bytes: int = Field(0, description="custom loop: outputs.logits kept until the next forward")
    activations_bytes: int = Field(description="saved for backward, whole model, at the end of forward")
    activations_per_layer_bytes: int
    activation_terms: dict[str, int] = Field(description="per-layer activation terms (bytes, one layer)")
    head_terms: dict[str, int]
    transient_bytes: int = Field(description="short-lived buffers at the peak (loss gradients, recomputation, "
                                             "dequantized weights)")
    peak_phase: str
    accumulating: bool = Field(False, description="gradient accumulation: the gradients outlive each micro-step "
                                                  "and are held in every phase")
    held_gradient_bytes: int = Field(0, description="gradient bytes alive at the peak (what sharding divides)")
    phase_bytes: dict[str, tuple[int, int]] = Field(
        default_factory=dict, description="per candidate peak phase: (gradient bytes held, other bytes held "
                                          "and transient), on top of weights and optimizer states")
    peak_allocated_bytes: int
    cuda_context_bytes: int
    allocator_slack_bytes: int
    required_bytes: int


def outside_allocator(peak_allocated: int) -> tuple[int, int]:
    """What a GPU needs beyond the allocator's peak: (fragmentation slack, CUDA context), from catalogs/memory.json."""
    rules = catalog.memory_rules()
    return int(peak_allocated * rules.allocator_slack), rules.cuda_context_bytes


def quantized_bytes(numel: int, double_quant: bool) -> int:
    """4-bit weight storage plus its quantization state (absmax per 64 values, nested if double-quantized)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the 16-entry NF4/FP4 code, fp32
    if double_quant:
        return packed + blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 256 * 4 + 4 + code
    return packed + blocks * 4 + code


def weight_bytes(layout: ModelLayout, setup: TrainingSetup) -> dict[str, int]:
    """Base weights by storage dtype for the method.

    QLoRA: exact nn.Linear and Conv1D layers (not the head, not nn.Linear subclasses) are
    stored in 4 bit; prepare_model_for_kbit_training upcasts every other parameter to fp32.
    """
    total = layout.total_params()
    if setup.method == "full":
        label, size = {"bf16": ("bf16", 2), "fp16": ("fp16", 2)}.get(setup.precision, ("fp32", 4))
        return {label: total * size}
    if setup.method == "lora":
        label = lora_base_dtype(setup)
        return {label: total * (4 if label == "fp32" else 2)}
    quant = sum(layout.instances(g) * quantized_bytes(g.weight_numel, setup.double_quant) for g in layout.modules
                if g.kind in QUANTIZED_KINDS)
    fp32 = sum(layout.instances(g) * qlora_group_bytes(g, setup.double_quant) for g in layout.modules) - quant
    return {setup.quant_type: quant, "fp32": fp32}


def lora_base_dtype(setup: TrainingSetup) -> str:
    """The storage dtype of LoRA's frozen base: fp32 under fp32, else half precision (fp16 under fp16)."""
    return "fp32" if setup.precision == "fp32" else ("fp16" if setup.precision.startswith("fp16") else "bf16")


def qlora_group_bytes(g: ModuleGroup, double_quant: bool | None, unquantized: int = 4) -> int:
    """One instance of a module group under QLoRA: 4-bit weights (with their constants) for exact nn.Linear and
    Conv1D layers, every other parameter at `unquantized` bytes (prepare_model_for_kbit_training's fp32)."""
    if g.kind in QUANTIZED_KINDS:
        return quantized_bytes(g.weight_numel, double_quant) + g.bias * unquantized
    return g.params() * unquantized


def unquantized_matmul_params(layout: ModelLayout) -> int:
    """QLoRA: weights of matmul layers that stay unquantized (nn.Linear subclasses, fused MoE experts)."""
    return sum(g.weight_numel * layout.instances(g) for g in layout.modules if g.kind in UNQUANTIZED_MATMUL_KINDS)


def trainable_tensors(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup]) -> list[opt.Trainable]:
    """Every trainable tensor's shape, and whether it is an nn.Embedding weight (for optimizers whose state
    depends on shape and module)."""
    tensors: list[opt.Trainable] = []
    if setup.method == "full":
        for g in layout.modules:
            for _ in range(layout.instances(g)):
                if not g.shared_weight:
                    if g.kind == "norm" or g.weight_numel == g.out_features:  # vectors
                        shape: tuple[int, ...] = (g.weight_numel,)
                    elif g.kind == "experts":
                        experts = layout.dims.experts
                        shape = (experts, g.weight_numel // experts)
                    else:
                        shape = (g.out_features, g.weight_numel // max(g.out_features, 1))
                    tensors.append(opt.Trainable(shape, g.kind == "embedding"))
                if g.bias:
                    tensors.append(opt.Trainable((g.bias,)))
        return tensors
    r = setup.lora.r
    for g in adapted:
        rank = r * g.lora_rank_factor
        tensors += [opt.Trainable((rank, g.in_features)), opt.Trainable((g.out_features, rank))] * layout.instances(g)
    return tensors


def _grads_not_yet_at_first_layer(layout: ModelLayout, counts: ParamCounts, adapted: list[ModuleGroup], lora,
                                   grad_size: int) -> int:
    """Gradient bytes that do not exist yet while backward runs through the first layer:
    that layer's own, and (full fine-tuning) an untied embedding's."""
    if counts.adapter_params:
        return sum(lora_params(g, lora.r) for g in adapted if g.per_layer) * grad_size
    layer = layout.layer_params()
    embedding = sum(g.params() for g in layout.modules if g.kind == "embedding") if not layout.dims.tied_embeddings \
        else 0
    return (layer + embedding) * grad_size


def _grads_at_last_layer(layout: ModelLayout, adapted: list[ModuleGroup], lora, grad_size: int, full: bool) -> int:
    """Gradient bytes that exist while backward runs through the last layer: those of the modules above the
    layers (the head, a projection after the last layer, the norms; a tied head's lands in the embedding's
    .grad), or their adapters'. Not divided by sharding: FSDP's root unit, which holds the head, reduce-scatters
    only at the end of backward."""
    if not full:
        return sum(lora_params(g, lora.r) for g in adapted if not g.per_layer) * grad_size
    above = sum(g.params() for g in layout.modules if not g.per_layer and (g.role == "final" or g.kind == "norm"))
    tied = sum(g.weight_numel for g in layout.modules if g.shared_weight)
    return (above + tied) * grad_size


def gradient_bytes(setup: TrainingSetup) -> int:
    """Bytes of one trained parameter's gradient: the parameter's dtype - half precision for a pure bf16/fp16
    full fine-tune, fp32 otherwise (master weights, PEFT's fp32 adapters)."""
    return 2 if setup.method == "full" and setup.precision in ("bf16", "fp16") else 4


def embedding_backward(layout: ModelLayout, setup: TrainingSetup, grad_size: int, accumulating: bool = False,
                       gathered_half: bool = False) -> int:
    """Full fine-tuning: the embedding's backward allocates a dense vocab x hidden gradient to add to one that
    already exists - a tied head's, or with gradient accumulation the earlier micro-steps' (`grad_size` bytes
    per element: the new gradient's, bf16 for a weight gathered in bf16). Tied, autograd sums the two before
    .grad: under autocast the head's arrives as the weight cast's own fp32 tensor and takes the sum in place
    (measured 4 bytes per element); without autocast, or with the weights gathered in bf16, the sum is a new
    tensor beside both (measured 2 x 2 bytes with bf16 gradients, 2 x 4 with fp32 under FSDP:
    benchmarks/ACCURACY.md, benchmarks/FSDP.md)."""
    if setup.method != "full" or not (layout.dims.tied_embeddings or accumulating):
        return 0
    if not layout.dims.tied_embeddings:
        return grad_size * layout.dims.vocab * layout.dims.hidden
    in_place = setup.precision.endswith("-mixed") and not gathered_half
    return (4 if in_place else 2 * grad_size) * layout.dims.vocab * layout.dims.hidden


def _head_gradient(layout: ModelLayout, setup: TrainingSetup, grad_size: int, head: dict[str, int],
                   numel: int, gathered_half: bool = False) -> tuple[int, int]:
    """Gradient accumulation, full fine-tuning: the moment the head's new weight gradient exists beside the held
    ones, as (activations freed by then, bytes made). Without autocast the head's backward makes it beside the
    logits' gradient; under autocast it is made in bf16 for the weight copy, then cast: at the cast the head's
    saved input and weight copy are gone, the bf16 gradient and its fp32 cast exist. With the weights gathered
    in bf16 (FSDP's policy) it is made in bf16 for the gathered weight and never cast. Untied, the new gradient
    is added into .grad at once; tied, autograd holds it until the embedding's backward (`pending`). `numel`:
    the head weight's elements."""
    dt = act.step_dtypes(setup)
    logits_grad = setup.tokens * layout.dims.vocab * dt.compute
    freed = head.get("log_softmax", 0)
    during = (freed, numel * (2 if dt.autocast else grad_size) + logits_grad)
    if not dt.autocast or gathered_half:
        return during
    cast = (freed + head.get("head_input", 0) + head.get("head_weight_copy", 0), numel * (2 + grad_size))
    return max(during, cast, key=lambda t: t[1] - t[0])


def estimate_memory(layout: ModelLayout, setup: TrainingSetup, counts: ParamCounts | None = None,
                    device: act.Device = "cuda", gathered_half: bool = False,
                    accumulating: bool = False) -> MemoryBreakdown:
    """Itemised per-GPU memory of one training step of `layout` under `setup`.

    `device="cpu"` models the CPU's kernels instead (dropout keeps its noise, not a bool mask; the optimizers'
    CPU code paths), which is what `ftplan measure --device cpu` compares with. `gathered_half`: parameter
    sharding gathers every parameter in the compute dtype (ftplan.estimate.sharding): no autocast copies, a
    half-precision residual stream under -mixed, fp32 MoE experts computing in it.
    `accumulating`: a later micro-step of gradient accumulation, where the gradients of the earlier ones are held
    from the forward on and each new gradient is a transient added into them.
    """
    counts = counts or count_params(layout, setup.method, setup.lora)
    adapted = adapted_groups(layout, counts.targets) if counts.targets else []
    weights = weight_bytes(layout, setup)
    adapter = counts.adapter_params * 4
    grad_size = gradient_bytes(setup)
    gradients = counts.trainable_params * grad_size
    tensors = trainable_tensors(layout, setup, adapted)
    states = opt.state_bytes(tensors, setup)
    paged = states if opt.paged(setup) else 0
    states -= paged
    logits = act.logits_kept(layout, setup)
    static = sum(weights.values()) + adapter + states + logits
    phases, activations, layer, head = _phases(layout, setup, counts, adapted, device, gradients, grad_size,
                                               opt.step_transient(tensors, setup, device), gathered_half,
                                               accumulating)
    phase = max(phases, key=lambda k: sum(phases[k]))
    held, transient = phases[phase]
    first_held = layer.total if not setup.grad_ckpt else act.checkpointed_layer(layout, setup, gathered_half)
    grads_held = dict.fromkeys(phases, gradients) if accumulating else {
        END_OF_BACKWARD: gradients, OPTIMIZER_STEP: gradients, FIRST_LAYER: phases[FIRST_LAYER][0] - first_held}
    phase_bytes = {k: (grads_held.get(k, 0), sum(v) - grads_held.get(k, 0)) for k, v in phases.items()}
    peak = static + held + transient
    slack, context = outside_allocator(peak)
    return MemoryBreakdown(
        weights_bytes=sum(weights.values()), weights_by_dtype=weights, adapter_bytes=adapter,
        gradients_bytes=gradients, optimizer_bytes=states, paged_optimizer_bytes=paged,
        optimizer_step_bytes=phases[OPTIMIZER_STEP][1], logits_kept_bytes=logits,
        activations_bytes=activations, activations_per_layer_bytes=layer.total, activation_terms=layer.terms,
        head_terms=head, transient_bytes=transient,
        peak_phase=phase, accumulating=accumulating, held_gradient_bytes=grads_held.get(phase, 0),
        phase_bytes=phase_bytes,
        peak_allocated_bytes=peak, cuda_context_bytes=context,
        allocator_slack_bytes=slack, required_bytes=peak + slack + context + paged,
    )


def _phases(layout: ModelLayout, setup: TrainingSetup, counts: ParamCounts, adapted: list[ModuleGroup],
            device: act.Device, gradients: int, grad_size: int, optimizer_step: int, gathered_half: bool = False,
            accumulating: bool = False):
    """Candidates for the peak, each as (what is held, what is transient on top), beyond the static bytes.

    The backward pass frees activations layer by layer while gradients accumulate, so within it the peak is at
    one end: just after the loss (all activations) or at the end (all gradients); then the optimizer steps."""
    layer = act.layer_activations(layout, setup, adapted, device, gathered_half)
    head = act.head_activations(layout, setup, adapted, device, gathered_half)
    layers = layout.dims.layers
    if setup.grad_ckpt:
        # Only layer inputs are kept; autocast's cache still holds the bf16 weight copies until
        # the forward ends, and one layer is recomputed at a time in backward.
        kept = layers * act.checkpointed_layer(layout, setup, gathered_half)
        forward_only = layers * layer.terms.get("weight_copies", 0) if setup.method == "full" else 0
        recompute = layer.total
    else:
        kept = layers * layer.total - act.first_layer_savings(layout, setup, adapted, device, gathered_half)
        forward_only, recompute = 0, 0
    activations = kept + sum(head.values())
    dequant = 0
    if setup.method == "qlora":
        quant = [g for g in layout.modules if g.kind in QUANTIZED_KINDS]
        dequant = max((g.weight_numel * 2 for g in quant), default=0)
    layer_backward = act.backward_layer_transient(layout, setup, adapted, gathered_half) + dequant
    # made inside a layer's backward, over by the end of it
    expert_gradient = act.cpu_expert_gradient(layout, setup, adapted, device, gathered_half)
    first_layer_held = layer.total if not setup.grad_ckpt else act.checkpointed_layer(layout, setup, gathered_half)
    # accumulating: every gradient is held from the forward on
    earlier = gradients if accumulating else 0
    grads_at_first_layer = earlier or gradients - _grads_not_yet_at_first_layer(layout, counts, adapted, setup.lora,
                                                                                 grad_size)
    grads_at_last_layer = earlier or _grads_at_last_layer(layout, adapted, setup.lora, grad_size,
                                                          setup.method == "full")
    loss_forward, loss_backward = act.loss_transients(layout, setup)
    full_accumulating = accumulating and setup.method == "full"
    head_numel = layout.head_numel()
    # a new gradient of a weight gathered in bf16 (FSDP's policy) is bf16 until FSDP reduces it
    new_grad_size = 2 if gathered_half and setup.precision.endswith("-mixed") else grad_size
    pending = head_numel * new_grad_size if full_accumulating and layout.dims.tied_embeddings else 0
    embedding = embedding_backward(layout, setup, new_grad_size, accumulating, gathered_half)
    phases = {
        END_OF_FORWARD: (activations + earlier, forward_only + loss_forward),
        BACKWARD_START: (activations + earlier, loss_backward),
        # the head's backward has run: what it saved (its input, autocast's weight copy, log-softmax's output,
        # the final norm's) is freed and its gradients exist; only the embedding's dropout mask waits
        LAST_LAYER: (activations - sum(v for k, v in head.items() if k != "embedding_dropout")
                     + grads_at_last_layer + pending,
                     layer_backward + recompute + expert_gradient),
        # by the first layer nearly every gradient exists (matters for wide adapters with checkpointing)
        FIRST_LAYER: (grads_at_first_layer + first_layer_held + pending,
                      layer_backward + recompute + expert_gradient),
        END_OF_BACKWARD: (gradients + pending, max(layer_backward, embedding)),
        OPTIMIZER_STEP: (gradients, optimizer_step),
    }
    if full_accumulating:
        freed, made = _head_gradient(layout, setup, grad_size, head, head_numel, gathered_half)
        phases[HEAD] = (activations - freed + earlier, made)
    return phases, activations, layer, head
