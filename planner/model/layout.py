"""What ftplan knows of a model's modules: a layout (path, kind, shape, bias per module group) and the
features that shape its activations. Built analytically (architectures.py) or read off a model built
on the meta device (meta_count.py); everything downstream reads only this.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ftplan.model.spec import Dims

ModuleKind = Literal[
    "linear",            # exactly torch.nn.Linear: quantized by bitsandbytes, LoRA-able
    "linear_subclass",   # a subclass of nn.Linear (FalconLinear): LoRA-able, left unquantized
    "conv1d",            # transformers' Conv1D (GPT-2): LoRA-able, quantized
    "head",              # the output projection (lm_head): never quantized, not in all-linear
    "embedding",         # nn.Embedding: LoRA-able by explicit name only
    "norm",              # RMSNorm / LayerNorm weights and biases
    "router",            # MoE router (not an nn.Linear in transformers 5)
    "experts",           # fused MoE expert weights (3-D parameters)
    "other",             # any other parameter (fallback layouts): counted, never adapted or quantized
]

# Which kinds of input feed a linear layer; layers sharing a role share one input tensor.
InputRole = Literal["attn_in", "attn_out", "mlp_in", "mlp_mid", "final", "embed", "none"]

LORA_KINDS = {"linear", "linear_subclass", "conv1d", "head", "embedding"}
# PEFT's all-linear also adapts MoE routers and fused experts through target_parameters
# (transformers 5 converted weights); they cannot be named in target_modules.
ALL_LINEAR_KINDS = {"linear", "linear_subclass", "conv1d", "router", "experts"}
# ...through PEFT's ParamWrapper, which folds the adapter into a full-size copy of the parameter each forward
PARAMETER_KINDS = {"router", "experts"}
QUANTIZED_KINDS = {"linear", "conv1d"}
# matmul weights bitsandbytes leaves alone under transformers 5 (it swaps exact nn.Linear/Conv1D only)
UNQUANTIZED_MATMUL_KINDS = ALL_LINEAR_KINDS - QUANTIZED_KINDS
# every kind whose weight multiplies activations (FLOPs, autocast weight copies)
MATMUL_KINDS = {"linear", "linear_subclass", "conv1d", "head", "router", "experts"}


class ModuleGroup(BaseModel):
    """One module (or one per layer, `per_layer`) with its weight shape and bias size."""

    path: str
    kind: ModuleKind
    in_features: int
    out_features: int
    weight_numel: int
    bias: int = 0
    per_layer: bool = False
    shared_weight: bool = False  # a tied head: its weight is the embedding's, counted once
    role: InputRole = "none"
    lora_rank_factor: int = 1  # PEFT gives fused experts rank r per expert (x2 for fused gate_up)

    @property
    def leaf(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def params(self) -> int:
        """Parameters one instance of this module adds to the model."""
        return (0 if self.shared_weight else self.weight_numel) + self.bias


class ArchFeatures(BaseModel):
    """What the activation model needs to know beyond the dimensions."""

    norm: Literal["rms", "layer"] = "rms"
    norms_per_layer: int = 2
    gated_mlp: bool = True
    parallel_attn: bool = False
    qk_norm: bool = False
    rotary: bool = True
    embedding_scale: bool = False
    embedding_norm: bool = False
    softcap: bool = False
    dropout: dict[str, float] = {}  # 'attention' / 'hidden' / 'embedding' probabilities active in training
    activation: str = "silu"  # the MLP's activation as transformers names it (config hidden_act / activation_function)


class ModelLayout(BaseModel):
    """Every module of a model, and the features that shape its activations."""

    model_type: str
    dims: Dims
    modules: list[ModuleGroup]
    features: ArchFeatures

    def instances(self, group: ModuleGroup) -> int:
        return self.dims.layers if group.per_layer else 1

    def total_params(self) -> int:
        return sum(g.params() * self.instances(g) for g in self.modules)

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        return sum(g.params() for g in self.modules if g.per_layer)

    def head_numel(self) -> int:
        """Elements of the output head's weight (a tied head shares the embedding's)."""
        return sum(g.weight_numel for g in self.modules if g.kind == "head")

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, head (FSDP's root unit)."""
        return sum(g.params() for g in self.modules if not g.per_layer)
