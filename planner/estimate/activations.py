"""Activation memory: the tensors autograd keeps for backward, term by term.

Each term names the operation that saves it, so a measured breakdown can be compared with it
(`ftplan measure`, benchmarks/ACCURACY.md). The model follows transformers 5 + PEFT + bitsandbytes
in a Hugging Face Trainer step:
- under autocast a linear layer casts a wider input to the compute dtype on every call and
  saves that copy only when its weight trains; frozen and 4-bit layers save nothing for their
  input. A weight stored in fp32 is cast too, and that bf16 copy is kept for backward (full
  bf16-mixed: every matmul weight; QLoRA: the fp32 head and unquantized layers);
- bitsandbytes' Linear4bit returns its output in its input's dtype: QLoRA's fp32 norm outputs
  make q/k/v and the MLP intermediates fp32;
- a LoRA adapter saves the compute-dtype copy of its input, lora_A's r-wide output and the
  dropout mask (a bool per element on CUDA; on the CPU dropout saves an fp32 noise tensor);
- RMSNorm upcasts to fp32 and saves that copy and 1/rms; LayerNorm runs in fp32 under autocast
  and saves its input, mean and rstd;
- the first layer of LoRA/QLoRA reads frozen embeddings that need no gradient: its first norm
  and its attention-side dropout masks save nothing;
- the loss upcasts the logits to fp32, and log-softmax keeps its fp32 output for backward.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import MATMUL_KINDS, PARAMETER_KINDS, QUANTIZED_KINDS, ModelLayout, ModuleGroup

Device = Literal["cuda", "cpu"]


class Dtypes(BaseModel):
    """Bytes per element of the tensors that flow through a training step."""

    compute: int      # matmul inputs/outputs (2 under bf16/fp16 autocast or pure half precision)
    residual: int     # the residual stream between layers
    autocast: bool
    base_trainable: bool
    quantized: bool   # QLoRA: 4-bit layers answer in their input's dtype
    device: Device
    # every parameter computes in the compute dtype: FSDP's mixed-precision policy gathers them so, DeepSpeed's
    # bf16 casts the module (ftplan.estimate.sharding)
    gathered_half: bool = False

    @property
    def layer_norm_fp32(self) -> bool:
        """CUDA autocast runs layer_norm in fp32 (an fp32 copy of its input, fp32 output); CPU autocast does not."""
        return self.autocast and self.device == "cuda"

    def mask(self, input_bytes: int) -> int:
        """Bytes per element a dropout keeps: CUDA's fused kernel a bool mask, the CPU the scaled noise."""
        return 1 if self.device == "cuda" else input_bytes


def step_dtypes(setup: TrainingSetup, device: Device = "cuda", gathered_half: bool = False) -> Dtypes:
    """Dtypes of a step. `-mixed` precisions autocast, plain bf16/fp16 do not, for every method.

    The residual stream follows the embedding's storage dtype: full bf16-mixed / fp16-mixed / fp32 keep
    fp32 weights (fp32 stream); pure bf16/fp16 keeps everything in 2 bytes; LoRA's frozen base is stored in
    half precision; QLoRA's embeddings are upcast to fp32 by prepare_model_for_kbit_training (fp32 stream).
    The compute dtype is what matmuls and attention return: half precision under autocast or with half
    weights, fp32 for QLoRA without autocast (its fp32 head, norms and 4-bit layers all answer in fp32).
    `gathered_half`: parameter sharding gathers the weights in the compute dtype (under -mixed), so the
    embeddings hand the layers a half-precision stream and norms answer in it.
    """
    half = setup.precision != "fp32"
    autocast = setup.precision.endswith("-mixed")
    if setup.method == "full":
        residual = 2 if setup.precision in ("bf16", "fp16") else 4
        compute = 2 if half else 4
    elif setup.method == "lora":
        residual = compute = 2 if half else 4
    else:
        residual, compute = 4, 2 if autocast else 4
    if gathered_half and autocast:
        residual = compute
    return Dtypes(compute=compute, residual=residual, autocast=autocast, base_trainable=setup.method == "full",
                  quantized=setup.method == "qlora", device=device, gathered_half=gathered_half)


class LayerActivations(BaseModel):
    """Bytes saved for backward by one decoder layer, by term."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def _norm_saved(layout: ModelLayout, width: int, tokens: int, dt: Dtypes) -> int:
    """RMSNorm: fp32 copy of the input + 1/rms (+ the normalised input when its weight trains).
    LayerNorm: its input (an fp32 copy under CUDA autocast), mean and rstd."""
    if layout.features.norm == "rms":
        weight_grad_input = tokens * width * dt.residual if dt.base_trainable else 0
        return tokens * width * 4 + tokens * 4 + weight_grad_input
    input_bytes = 4 if dt.layer_norm_fp32 else dt.residual
    return tokens * width * input_bytes + 2 * tokens * 4


def _norms_saved(layout: ModelLayout, tokens: int, dt: Dtypes) -> int:
    """Every norm of one layer. Parallel blocks whose two LayerNorms read the same residual keep one tensor for
    both, unless CUDA autocast gives each its own fp32 copy."""
    f = layout.features
    total = f.norms_per_layer * _norm_saved(layout, layout.dims.hidden, tokens, dt)
    if f.norm == "layer" and f.parallel_attn and f.norms_per_layer == 2 and not dt.layer_norm_fp32:
        total -= tokens * layout.dims.hidden * dt.residual
    return total


def _input_bytes(role: str, dt: Dtypes, layout: ModelLayout) -> int:
    """Dtype of the tensor a linear of this role reads."""
    if role in ("attn_in", "mlp_in", "final"):
        return 4 if (dt.layer_norm_fp32 and layout.features.norm == "layer") else dt.residual
    return dt.compute


def _output_bytes(layout: ModelLayout, role: str, dt: Dtypes) -> int:
    """Dtype of the outputs of the layers of a role: the input's for 4-bit layers, else the compute dtype."""
    quantized = any(g.kind in QUANTIZED_KINDS for g in layout.modules if g.per_layer and g.role == role)
    return _input_bytes(role, dt, layout) if dt.quantized and quantized else dt.compute


def linear_inputs_saved(layout: ModelLayout, groups: list[ModuleGroup], tokens: int, dt: Dtypes) -> int:
    """Inputs that trainable linear layers keep for their weight gradient.

    When the input is wider than the compute dtype, autocast makes one copy per consumer;
    when it is already in the compute dtype, consumers share the one tensor.
    """
    if not dt.base_trainable:
        return 0
    total = 0
    roles: dict[str, list[ModuleGroup]] = {}
    for g in groups:
        if g.kind in MATMUL_KINDS - {"experts"}:  # fused experts keep their gathered inputs (mlp_saved)
            roles.setdefault(g.role, []).append(g)
    for role, consumers in roles.items():
        width = consumers[0].in_features
        if _input_bytes(role, dt, layout) != dt.compute and dt.autocast:
            total += len(consumers) * tokens * width * dt.compute
        else:
            total += tokens * width * dt.compute
    return total


def autocast_weight_copies(groups: list[ModuleGroup], dt: Dtypes, r: int = 0, adapted=()) -> int:
    """bf16 copies of fp32 matmul weights that autocast makes and autograd keeps for backward (none when parameter
    sharding gathers them in bf16)."""
    if not dt.autocast or dt.gathered_half:
        return 0
    # fused MoE experts never get one: transformers' grouped_mm is not autocast-enabled and casts its input to
    # the experts' dtype instead (so they compute in fp32, see expert_bytes)
    if dt.base_trainable:  # full bf16-mixed: every matmul weight is fp32
        base = sum(g.weight_numel for g in groups if g.kind in MATMUL_KINDS - {"experts"})
    elif dt.quantized:      # QLoRA: what bitsandbytes left unquantized was upcast to fp32
        base = sum(g.weight_numel for g in groups if g.kind in MATMUL_KINDS - QUANTIZED_KINDS - {"experts"})
    else:                   # LoRA: the base is already bf16
        base = 0
    # ParamWrapper casts its factors to the parameter's dtype with autocast off (no compute-dtype copy)
    adapters = sum(r * g.lora_rank_factor * (g.in_features + g.out_features) for g in adapted
                   if g.kind not in PARAMETER_KINDS)
    return (base + adapters) * dt.compute


def lora_saved(layout: ModelLayout, adapted: list[ModuleGroup], r: int, dropout: float, tokens: int,
               dt: Dtypes) -> int:
    """Per adapted module: the compute-dtype input of lora_A, lora_A's output, the dropout mask
    (PEFT casts the input to the adapter dtype before dropout: fp32, or the compute dtype where parameter
    sharding gathers the adapters in it)."""
    total = 0
    saved = dt.compute if dt.autocast else 4  # without autocast lora_A runs on PEFT's fp32 copy of its input
    for g in adapted:
        if g.kind in PARAMETER_KINDS:  # no x @ A path: see parameter_lora_saved
            continue
        total += tokens * g.in_features * saved + tokens * r * g.lora_rank_factor * saved
        if dropout > 0:
            total += tokens * g.in_features * dt.mask(adapter_bytes(dt))
    return total


def adapter_bytes(dt: Dtypes) -> int:
    """Bytes per element of LoRA adapters as they compute: fp32 as PEFT creates them, the compute dtype where
    parameter sharding's mixed-precision policy gathers them."""
    return dt.compute if dt.gathered_half and dt.autocast else 4


def parameter_lora_saved(adapted: list[ModuleGroup], r: int, dt: Dtypes) -> int:
    """PEFT's ParamWrapper (MoE routers and fused experts under all-linear) folds the adapter into the weight each
    forward (baddbmm(W, B, A), in W's dtype) and the matmul keeps that full-size effective weight for backward;
    the fold keeps its factors, cast to W's dtype where that is not the adapters' fp32."""
    folded = [g for g in adapted if g.kind in PARAMETER_KINDS]
    w = expert_bytes(dt)
    factors = sum(r * g.lora_rank_factor * (g.in_features + g.out_features) for g in folded) * w if w != 4 else 0
    return sum(g.weight_numel for g in folded) * w + factors


def attention_saved(layout: ModelLayout, setup: TrainingSetup, dt: Dtypes) -> dict[str, int]:
    """q/k/v as the kernel receives them, the kernel's saved outputs, and eager's score matrices.

    A fused projection (qkv_proj, query_key_value, c_attn) whose output is already in the compute
    dtype stays alive whole: v (and q, k without rotary) are views of it.
    """
    d, f = layout.dims, layout.features
    b, s, t, c = setup.batch_size, setup.seq_len, setup.tokens, dt.compute
    qkv = t * (d.q_dim + 2 * d.kv_dim) * c
    fused = any(g.per_layer and g.role == "attn_in" and g.out_features == d.q_dim + 2 * d.kv_dim
                for g in layout.modules)
    if fused and f.rotary and _output_bytes(layout, "attn_in", dt) == c:
        qkv += t * (d.q_dim + d.kv_dim) * c  # rotary q and k are new tensors beside the fused output
    terms = {"attn_qkv": qkv}
    if f.qk_norm:
        terms["attn_qk_norm"] = t * (d.q_dim + d.kv_dim) * 4 + t * (d.heads + d.kv_heads) * 4
    if setup.attention == "eager":
        repeat = 2 * t * (d.q_dim - d.kv_dim) * c if d.kv_heads != d.heads else 0
        softcap = b * d.heads * s * s * c if f.softcap else 0  # tanh(scores / cap) keeps its output
        # softmax runs in fp32 and is cast back: both copies are saved.
        terms["attn_scores"] = b * d.heads * s * s * (4 + c) + repeat + softcap
        if layout_dropout(layout, "attention") > 0:
            terms["attn_dropout"] = b * d.heads * s * s * dt.mask(c)
    elif sdpa_math_path(layout, dt):
        # SDPA's math path: on the CPU it upcasts q, k and v to fp32 (allowFP16BF16ReductionMathSDP is off) and
        # keeps the softmax (plus, with dropout, its noise and output); k and v are expanded to every head
        # when the model hands SDPA fewer kv heads without enable_gqa (Falcon-7B's multi-query attention)
        width = 4 if dt.device == "cpu" else c
        kv = d.q_dim if d.kv_heads != d.heads else d.kv_dim
        dropped = layout_dropout(layout, "attention") > 0
        terms["attn_qkv"] = t * (d.q_dim + 2 * kv) * width
        terms["attn_math_scores"] = (3 if dropped else 1) * b * d.heads * s * s * width
    else:
        terms["attn_kernel_out"] = t * d.q_dim * c + b * d.heads * s * 4  # output + logsumexp
    return terms


def sdpa_math_path(layout: ModelLayout, dt: Dtypes) -> bool:
    """Where SDPA cannot use a fused kernel and runs its math path: on the CPU with attention dropout (the
    CPU's flash kernel refuses dropout; CUDA's drops out inside the kernel), and everywhere when the model
    passes fewer key/value heads than query heads without enable_gqa (Falcon's own attention, multi-query)."""
    cpu_dropout = dt.device == "cpu" and layout_dropout(layout, "attention") > 0
    return cpu_dropout or (layout.model_type == "falcon" and layout.dims.kv_heads != layout.dims.heads)


def layout_dropout(layout: ModelLayout, where: str) -> float:
    """Dropout probability the config sets for `where` ('attention' or 'hidden'); 0 when absent."""
    return layout.features.dropout.get(where, 0.0)


def mlp_saved(layout: ModelLayout, tokens: int, dt: Dtypes, adapted: list[ModuleGroup] = ()) -> dict[str, int]:
    """Gated MLPs keep gate, act(gate) and up; plain MLPs keep the pre-activation. MoE keeps them per routed token."""
    d = layout.dims
    # parallel blocks with one norm (Falcon-7B, Phi-2) feed the MLP from the attention's input
    role = "mlp_in" if any(g.per_layer and g.role == "mlp_in" for g in layout.modules) else "attn_in"
    width = _output_bytes(layout, role, dt)
    per_token = (3 if layout.features.gated_mlp else 1) * d.intermediate * width
    if d.experts:
        # transformers 5's fused experts (grouped_mm): per routed token the gate_up output, act(gate) and the
        # down output (weighted by the router after); trained experts also keep down's input and the gathered
        # hidden state for their weight gradients (so do experts LoRA adapts, whose effective weight trains).
        # All in the experts' own dtype (grouped_mm ignores autocast).
        c = expert_bytes(dt)
        routed = tokens * d.experts_per_token
        adapted_experts = any(g.kind == "experts" for g in adapted)
        trained = (d.intermediate + d.hidden) * c if dt.base_trainable or adapted_experts else 0
        return {"mlp_experts": routed * (3 * d.intermediate * c + d.hidden * c + trained),
                "mlp_router": tokens * d.experts * 4 * 2}
    terms = {"mlp_intermediate": tokens * per_token}
    if layout.features.activation in TANH_GELU_CHAINS:
        terms["mlp_gelu_chain"] = gelu_chain(tokens * d.intermediate, dt)
    return terms


def expert_bytes(dt: Dtypes) -> int:
    """Bytes per element fused MoE experts compute in: their storage dtype, which is the residual stream's
    (fp32 masters under full -mixed, QLoRA's fp32 upcast, half-precision LoRA bases and pure bf16/fp16), or
    the compute dtype where parameter sharding gathers them in it."""
    return dt.compute if dt.gathered_half else dt.residual


# activations transformers writes as a chain of elementwise ops, each intermediate kept by autograd
# (gelu_new: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))); gelu_pytorch_tanh is one fused op
TANH_GELU_CHAINS = {"gelu_new", "gelu_fast"}


def gelu_chain(elements: int, dt: Dtypes) -> int:
    """What gelu_new keeps beyond its input: tanh's output, 1 + tanh and 0.5 * x (the final product is the next
    linear's input). CUDA autocast runs pow in fp32, which makes the first two fp32; the CPU keeps them in the
    compute dtype."""
    if dt.device == "cuda" and dt.autocast:
        return elements * (4 + 4 + dt.compute)
    return elements * 3 * dt.compute


def layer_activations(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup],
                      device: Device = "cuda", gathered_half: bool = False) -> LayerActivations:
    """Everything one decoder layer saves for backward without gradient checkpointing."""
    dt = step_dtypes(setup, device, gathered_half)
    t, h = setup.tokens, layout.dims.hidden
    layer_groups = [g for g in layout.modules if g.per_layer]
    adapted_here = [g for g in adapted if g.per_layer]
    r = setup.lora.r if setup.lora else 0
    terms = {"norms": _norms_saved(layout, t, dt)}
    terms["linear_inputs"] = linear_inputs_saved(layout, layer_groups, t, dt)
    terms["weight_copies"] = autocast_weight_copies(layer_groups, dt, r, adapted_here)
    terms.update(attention_saved(layout, setup, dt))
    terms.update(mlp_saved(layout, t, dt, adapted_here))
    if adapted_here:
        terms["lora"] = lora_saved(layout, adapted_here, r, setup.lora.dropout, t, dt)
    if folded := parameter_lora_saved(adapted_here, r, dt):
        terms["lora_folded_weights"] = folded
    if layout_dropout(layout, "hidden") > 0:
        terms["hidden_dropout"] = 2 * t * h * dt.mask(dt.compute)
    return LayerActivations(terms=terms)


def first_layer_savings(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup],
                        device: Device = "cuda", gathered_half: bool = False) -> int:
    """What the first layer does not save when its input needs no gradient (frozen embeddings):
    its first norm, and the dropout masks of the adapters that read that norm's output."""
    if setup.method == "full":
        return 0
    dt = step_dtypes(setup, device, gathered_half)
    t = setup.tokens
    saved = _norm_saved(layout, layout.dims.hidden, t, dt)
    if setup.lora and setup.lora.dropout > 0:
        saved += sum(t * g.in_features * dt.mask(adapter_bytes(dt)) for g in adapted
                     if g.per_layer and g.role == "attn_in")
    return saved


def checkpointed_layer(layout: ModelLayout, setup: TrainingSetup, gathered_half: bool = False) -> int:
    """With gradient checkpointing a layer keeps only its input (the residual stream)."""
    return setup.tokens * layout.dims.hidden * step_dtypes(setup, gathered_half=gathered_half).residual


def backward_layer_transient(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup] = (),
                             gathered_half: bool = False) -> int:
    """Gradient buffers alive while backward runs through one MLP (the widest part of a layer),
    plus, with adapters, the gradient of the widest input PEFT cast to the adapter dtype (fp32, or the compute
    dtype where every parameter computes in it), or, for a
    parameter PEFT's ParamWrapper adapts, the gradient of its full-size effective weight."""
    d, dt = layout.dims, step_dtypes(setup, gathered_half=gathered_half)
    width = d.intermediate * max(1, d.experts_per_token)
    mlp_bytes = expert_bytes(dt) if d.experts else dt.compute
    linear = [g for g in adapted if g.per_layer and g.kind not in PARAMETER_KINDS]
    lora_input = max((g.in_features for g in linear), default=0)
    mlp = setup.tokens * width * mlp_bytes
    # a folded weight's gradient is made beside one intermediate's gradient, before the MLP's others exist
    lora_input_grad = lora_input * adapter_bytes(dt)  # the gradient of PEFT's cast of the input to the adapters
    return setup.tokens * (d.hidden * 4 + lora_input_grad) + max(2 * mlp, mlp + _folded_gradient(adapted, dt))


def cpu_expert_gradient(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup], device: Device,
                        gathered_half: bool = False) -> int:
    """Bytes alive while a layer's backward makes its expert weights' gradient on the CPU, beyond the layer's
    transient: torch's CPU grouped_mm computes a bf16/fp16 expert weight's gradient through an fp32 buffer of
    one expert's weight outside the c10 allocator (only the resident set shows it: 4 bytes per element of one
    expert, measured at 2-8 experts and two widths; fp32 experts have none; CUDA accumulates in registers), and
    under full fine-tuning the layer's expert gradients already exist then. Folded adapters' gradients are in
    `backward_layer_transient`."""
    dt = step_dtypes(setup, gathered_half=gathered_half)
    experts = [g for g in layout.modules if g.per_layer and g.kind == "experts"]
    trained = setup.method == "full" or any(g.kind == "experts" for g in adapted)
    if device != "cpu" or not experts or not trained or expert_bytes(dt) != 2:
        return 0
    grads = sum(g.weight_numel for g in experts) * 2 if setup.method == "full" else 0
    return 4 * max(g.in_features * g.out_features for g in experts) + grads


def _folded_gradient(adapted: list[ModuleGroup], dt: Dtypes) -> int:
    """The gradient of a ParamWrapper's effective weight, beyond the effective weights still saved: backward meets
    them in reverse order, each freeing its saved weight, so the peak is max over j of (the weights saved up to
    j, in forward order) + j's gradient, of which the layer's saved term already holds them all."""
    sizes = [g.weight_numel for g in adapted if g.per_layer and g.kind in PARAMETER_KINDS]
    if not sizes:
        return 0
    peak = max(sum(sizes[:j + 1]) + sizes[j] for j in range(len(sizes)))
    return (peak - sum(sizes)) * expert_bytes(dt)


def head_activations(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup],
                     device: Device = "cuda", gathered_half: bool = False) -> dict[str, int]:
    """Outside the layers: the final norm, the head's input and weight copy, log-softmax's fp32 output."""
    dt = step_dtypes(setup, device, gathered_half)
    t, d = setup.tokens, layout.dims
    head = next(g for g in layout.modules if g.kind == "head")
    top_level = [g for g in layout.modules if not g.per_layer and g.kind != "embedding"]
    adapted_top = [g for g in adapted if not g.per_layer]
    r = setup.lora.r if setup.lora else 0
    terms = {"final_norm": _norm_saved(layout, d.hidden, t, dt),
             "head_input": linear_inputs_saved(layout, top_level, t, dt),
             "head_weight_copy": autocast_weight_copies(top_level, dt, r, adapted_top)}
    if adapted_top:
        terms["lora_top_level"] = lora_saved(layout, adapted_top, r, setup.lora.dropout, t, dt)
    if layout_dropout(layout, "embedding") > 0:  # GPT-2's embd_pdrop, once per model
        terms["embedding_dropout"] = t * d.hidden * dt.mask(dt.residual)
    terms["log_softmax"] = t * head.out_features * 4
    return terms


def loss_transients(layout: ModelLayout, setup: TrainingSetup) -> tuple[int, int]:
    """Extra bytes around the loss, (forward, backward): the logits and the fp32 copy the loss makes of
    half-precision logits (fp32 logits need none) at the end of forward; in backward the fp32 gradients of
    log-softmax's output and input."""
    dt = step_dtypes(setup)
    vocab_bytes = setup.tokens * layout.dims.vocab
    # Gemma-2's final-logit softcapping (logits / cap, tanh, * cap in the compute dtype): tanh keeps its output
    softcap = vocab_bytes * dt.compute if layout.features.softcap else 0
    upcast = 4 if dt.compute != 4 else 0
    return vocab_bytes * (dt.compute + upcast) + softcap, vocab_bytes * 8 + softcap


def logits_kept(layout: ModelLayout, setup: TrainingSetup) -> int:
    """A plain PyTorch/accelerate loop keeps `outputs` (the logits, in the compute dtype) until the next forward
    rebinds it: through backward, the optimizer step and the next forward - resident, in effect. The Trainer
    keeps only the loss."""
    return setup.tokens * layout.dims.vocab * step_dtypes(setup).compute if setup.loop == "custom" else 0
