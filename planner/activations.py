"""Activation memory: the tensors autograd keeps for backward, term by term.

Each term names the operation that saves it, so a measured breakdown can be compared with it.
The model follows what transformers 5 + PEFT do in a Hugging Face Trainer step:
- under autocast (mixed precision, or LoRA/QLoRA with bf16/fp16 compute) a linear layer casts
  a wider input to the compute dtype on every call, and saves that copy only when its weight
  is trainable; frozen and 4-bit base layers save nothing for their input;
- a LoRA adapter saves the compute-dtype copy of its input (and the dropout mask), and the
  r-wide output of lora_A;
- RMSNorm (transformers' eager implementation) upcasts to fp32 and saves that copy and the
  reciprocal RMS; LayerNorm runs in fp32 under autocast and saves its input, mean and rstd;
- the loss upcasts the logits to fp32, and log-softmax keeps its fp32 output for backward.
"""

from __future__ import annotations

from pydantic import BaseModel

from .architectures import ModelLayout, ModuleGroup
from .settings import TrainingSetup

BOOL_MASK_BYTES = 1


class Dtypes(BaseModel):
    """Bytes per element of the tensors that flow through a training step."""

    compute: int      # matmul inputs/outputs (2 under bf16/fp16 autocast or pure half precision)
    residual: int     # the residual stream between layers
    autocast: bool
    base_trainable: bool


def step_dtypes(setup: TrainingSetup) -> Dtypes:
    """Dtypes of a step: the residual stream follows the embedding's storage dtype.

    full bf16-mixed / fp16-mixed / fp32 keep fp32 weights, so the residual stream is fp32;
    pure bf16/fp16 keeps everything in 2 bytes; LoRA's frozen base is bf16; QLoRA's embeddings
    are upcast to fp32 by prepare_model_for_kbit_training, so its residual stream is fp32.
    """
    half = setup.precision != "fp32"
    compute = 2 if half else 4
    if setup.method == "full":
        residual = 2 if setup.precision in ("bf16", "fp16") else 4
        autocast = setup.precision in ("bf16-mixed", "fp16-mixed")
    elif setup.method == "lora":
        residual, autocast = (2, True) if half else (4, False)
    else:
        residual, autocast = 4, half
    return Dtypes(compute=compute, residual=residual, autocast=autocast, base_trainable=setup.method == "full")


class LayerActivations(BaseModel):
    """Bytes saved for backward by one decoder layer, by term."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def _norm_saved(layout: ModelLayout, width: int, tokens: int, dt: Dtypes) -> int:
    """RMSNorm: fp32 copy of the input + 1/rms (+ the normalised input when its weight trains).
    LayerNorm: its input (fp32 under autocast), mean and rstd."""
    if layout.features.norm == "rms":
        weight_grad_input = tokens * width * dt.residual if dt.base_trainable else 0
        return tokens * width * 4 + tokens * 4 + weight_grad_input
    input_bytes = 4 if dt.autocast else dt.residual
    return tokens * width * input_bytes + 2 * tokens * 4


def _input_bytes(role: str, dt: Dtypes, layout: ModelLayout) -> int:
    """Dtype of the tensor a linear of this role reads."""
    if role in ("attn_in", "mlp_in", "final"):
        return 4 if (dt.autocast and layout.features.norm == "layer") else dt.residual
    return dt.compute


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
        if g.kind in ("linear", "linear_subclass", "conv1d", "router", "experts"):
            roles.setdefault(g.role, []).append(g)
    for role, consumers in roles.items():
        width = consumers[0].in_features
        if _input_bytes(role, dt, layout) != dt.compute and dt.autocast:
            total += len(consumers) * tokens * width * dt.compute
        else:
            total += tokens * width * dt.compute
    return total


def lora_saved(adapted: list[ModuleGroup], r: int, dropout: float, tokens: int, dt: Dtypes) -> int:
    """Per adapted module: the compute-dtype input of lora_A, lora_A's output, the dropout mask."""
    total = 0
    for g in adapted:
        rank = r * g.lora_rank_factor
        total += tokens * g.in_features * dt.compute + tokens * rank * dt.compute
        if dropout > 0:
            total += tokens * g.in_features * BOOL_MASK_BYTES
    return total


def attention_saved(layout: ModelLayout, setup: TrainingSetup, dt: Dtypes) -> dict[str, int]:
    """q/k/v after rotary, the attention kernel's saved outputs, and eager's score matrices."""
    d, f = layout.dims, layout.features
    b, s, t, c = setup.batch_size, setup.seq_len, setup.tokens, dt.compute
    terms = {"attn_qkv": t * (d.q_dim + 2 * d.kv_dim) * c}
    if f.qk_norm:
        terms["attn_qk_norm"] = t * (d.q_dim + d.kv_dim) * 4 + t * (d.heads + d.kv_heads) * 4
    if setup.attention == "eager":
        repeat = 2 * t * (d.q_dim - d.kv_dim) * c if d.kv_heads != d.heads else 0
        softcap = 2 * b * d.heads * s * s * c if f.softcap else 0
        # softmax runs in fp32 and is cast back: both copies are saved.
        terms["attn_scores"] = b * d.heads * s * s * (4 + c) + repeat + softcap
    else:
        terms["attn_kernel_out"] = t * d.q_dim * c + b * d.heads * s * 4  # output + logsumexp
    attn_dropout = float(layout_dropout(layout, "attention"))
    if attn_dropout > 0 and setup.attention == "eager":
        terms["attn_dropout"] = b * d.heads * s * s * (BOOL_MASK_BYTES + c)
    return terms


def layout_dropout(layout: ModelLayout, where: str) -> float:
    """Dropout probability the config sets for `where` ('attention' or 'hidden'); 0 when absent."""
    return layout.features.dropout.get(where, 0.0)


def mlp_saved(layout: ModelLayout, tokens: int, dt: Dtypes) -> dict[str, int]:
    """Gated MLPs keep gate, act(gate) and up; plain MLPs keep the pre-activation. MoE keeps them per routed token."""
    d, c = layout.dims, dt.compute
    per_token = (3 if layout.features.gated_mlp else 1) * d.intermediate * c
    if d.experts:
        routed = tokens * d.experts_per_token
        return {"mlp_experts": routed * (per_token + d.intermediate * c + 2 * d.hidden * c),
                "mlp_router": tokens * d.experts * 4 * 2}
    return {"mlp_intermediate": tokens * per_token}


def layer_activations(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup]) -> LayerActivations:
    """Everything one decoder layer saves for backward without gradient checkpointing."""
    dt = step_dtypes(setup)
    t, h = setup.tokens, layout.dims.hidden
    layer_groups = [g for g in layout.modules if g.per_layer]
    terms = {"norms": layout.features.norms_per_layer * _norm_saved(layout, h, t, dt)}
    terms["linear_inputs"] = linear_inputs_saved(layout, layer_groups, t, dt)
    terms.update(attention_saved(layout, setup, dt))
    terms.update(mlp_saved(layout, t, dt))
    adapted_here = [g for g in adapted if g.per_layer]
    if adapted_here:
        lora = setup.lora
        terms["lora"] = lora_saved(adapted_here, lora.r, lora.dropout, t, dt)
    hidden_dropout = layout_dropout(layout, "hidden")
    if hidden_dropout > 0:
        terms["hidden_dropout"] = 2 * t * h * (BOOL_MASK_BYTES + dt.compute)
    return LayerActivations(terms=terms)


def checkpointed_layer(layout: ModelLayout, setup: TrainingSetup) -> int:
    """With gradient checkpointing a layer keeps only its input (the residual stream)."""
    return setup.tokens * layout.dims.hidden * step_dtypes(setup).residual


def backward_layer_transient(layout: ModelLayout, setup: TrainingSetup) -> int:
    """Gradient buffers alive while backward runs through one MLP (the widest part of a layer)."""
    d, dt = layout.dims, step_dtypes(setup)
    width = d.intermediate * max(1, d.experts_per_token)
    return setup.tokens * (2 * width * dt.compute + d.hidden * 4)


def head_activations(layout: ModelLayout, setup: TrainingSetup, adapted: list[ModuleGroup]) -> dict[str, int]:
    """Outside the layers: the final norm, the head's input, and log-softmax's fp32 output."""
    dt = step_dtypes(setup)
    t, d = setup.tokens, layout.dims
    head = next(g for g in layout.modules if g.kind == "head")
    terms = {"final_norm": _norm_saved(layout, d.hidden, t, dt)}
    top_level = [g for g in layout.modules if not g.per_layer and g.kind != "embedding"]
    terms["head_input"] = linear_inputs_saved(layout, top_level, t, dt)
    adapted_top = [g for g in adapted if not g.per_layer]
    if adapted_top:
        terms["lora_top_level"] = lora_saved(adapted_top, setup.lora.r, setup.lora.dropout, t, dt)
    terms["log_softmax"] = t * head.out_features * 4
    if layout.features.embedding_scale:
        terms["embedding_scale"] = t * d.hidden * dt.residual
    return terms


def loss_transient(layout: ModelLayout, setup: TrainingSetup) -> int:
    """Peak extra bytes around the loss: in backward, the fp32 gradient of log-softmax's output
    and of its input coexist with the saved output (the forward's bf16 + fp32 logits are smaller)."""
    dt = step_dtypes(setup)
    vocab_bytes = setup.tokens * layout.dims.vocab
    forward = vocab_bytes * (dt.compute + 4)
    backward = vocab_bytes * 8
    softcap = 2 * vocab_bytes * 4 if layout.features.softcap else 0
    return max(forward, backward) + softcap
