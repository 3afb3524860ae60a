"""Training settings: what the user chose, completed with the defaults of the usual Hugging Face recipes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from ftplan.model.architectures import attention_for

Method = Literal["full", "lora", "qlora"]
# -mixed: autocast over the stored weights (TrainingArguments(bf16=True)); bf16/fp16: the weights are
# half precision and nothing autocasts (a model loaded in bf16, trained without bf16=True); fp32: neither
PRECISION_HELP = {
    "bf16-mixed": "autocast to bf16 - TrainingArguments(bf16=True); full fine-tuning keeps fp32 master "
                  "weights, LoRA/QLoRA a bf16 (or 4-bit) base",
    "bf16": "weights in bf16, no autocast - a model loaded with dtype=torch.bfloat16, trained without bf16=True",
    "fp16-mixed": "autocast to fp16 - TrainingArguments(fp16=True)",
    "fp16": "weights in fp16, no autocast",
    "fp32": "everything in fp32, no autocast (matmuls as TF32 with --tf32)",
}
Precision = Literal["bf16-mixed", "bf16", "fp16-mixed", "fp16", "fp32"]
# Hugging Face TrainingArguments.optim names; ftplan's earlier names stay accepted as aliases
OPTIMIZER_ALIASES = {"adamw": "adamw_torch_fused", "adamw_8bit": "adamw_bnb_8bit"}
Optimizer = Annotated[Literal["adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit",
                              "paged_adamw_32bit", "adafactor", "sgd"],
                      BeforeValidator(lambda v: OPTIMIZER_ALIASES.get(v, v) if isinstance(v, str) else v)]
# attention as transformers' attn_implementation names it; "flash" stays accepted
ATTENTION_ALIASES = {"flash": "flash_attention_2"}
Attention = Annotated[Literal["sdpa", "eager", "flash_attention_2"],
                      BeforeValidator(lambda v: ATTENTION_ALIASES.get(v, v) if isinstance(v, str) else v)]
# trainer: the Trainer's step, which keeps only the loss of the forward; custom: a plain PyTorch or accelerate
# loop (outputs = model(**batch); outputs.loss.backward()), which keeps outputs.logits until the next forward
Loop = Literal["trainer", "custom"]
QuantType = Literal["nf4", "fp4"]

METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
OPTIMIZERS: tuple[str, ...] = Optimizer.__origin__.__args__  # type: ignore[attr-defined]
ATTENTIONS: tuple[str, ...] = Attention.__origin__.__args__  # type: ignore[attr-defined]
LOOPS: tuple[str, ...] = Loop.__args__  # type: ignore[attr-defined]
DEFAULT_OPTIMIZER = {"full": "adamw_torch_fused", "lora": "adamw_torch_fused", "qlora": "paged_adamw_32bit"}


def _require_positive(value: int, label: str) -> int:
    if value <= 0:
        raise ValueError(f"{label} must be a positive integer, got {value}")
    return value


class LoraSettings(BaseModel):
    """LoRA adapter settings; `targets` None means PEFT's default for the architecture."""

    r: int = Field(16, description="adapter rank")
    alpha: int = Field(32, description="lora_alpha (scaling = alpha / r)")
    dropout: float = Field(0.05, description="lora_dropout")
    targets: list[str] | None = Field(None, description="module names, ['all-linear'], or None for PEFT's default")

    @field_validator("r", "alpha")
    @classmethod
    def _positive(cls, value: int, info) -> int:  # noqa: ANN001 - pydantic's ValidationInfo
        return _require_positive(value, f"lora {info.field_name}")

    @field_validator("dropout")
    @classmethod
    def _dropout_range(cls, p: float) -> float:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {p}")
        return p


class TrainingSetup(BaseModel):
    """One training configuration, per GPU. Every field is explicit once `resolve` has run."""

    method: Method
    batch_size: int = Field(1, description="micro-batch per GPU (sequences)")
    seq_len: int = Field(2048, description="tokens per sequence")
    precision: Precision = "bf16-mixed"
    optimizer: Optimizer = "adamw_torch_fused"
    grad_ckpt: bool = False
    attention: Attention = "sdpa"
    loop: Loop = "trainer"
    tf32: bool = Field(False, description="fp32 matmuls on TF32 tensor cores: TrainingArguments(tf32=True), i.e. "
                                          "torch.backends.cuda.matmul.allow_tf32 (PyTorch's default is off); only "
                                          "fp32 precision has fp32 matmuls, so it is kept only with it")
    sync_each_batch: bool = Field(False, description="FSDP with gradient accumulation: reduce-scatter the gradients "
                                                     "every micro-batch (accelerate's sync_each_batch) instead of "
                                                     "holding them unsharded until the last, as the Trainer does")
    lora: LoraSettings | None = None
    quant_type: QuantType | None = Field("nf4", description="4-bit type of QLoRA's frozen base; null otherwise")
    double_quant: bool | None = Field(True, description="QLoRA: quantize the quantization constants; null otherwise")

    @field_validator("batch_size", "seq_len")
    @classmethod
    def _positive(cls, value: int, info) -> int:  # noqa: ANN001 - pydantic's ValidationInfo
        return _require_positive(value, info.field_name.replace("_", "-"))

    @model_validator(mode="after")
    def _lora_only_for_adapters(self) -> "TrainingSetup":
        if self.method == "full" and self.lora is not None:
            self.lora = None
        if self.method != "qlora":  # a plan carries only settings that apply: no 4-bit type without QLoRA
            self.quant_type = self.double_quant = None
        if self.precision != "fp32":  # autocast and half-precision weights leave no fp32 matmul to TF32
            self.tf32 = False
        return self

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


class SetupChoices(BaseModel):
    """What the user set on the command line; None means 'use the recipe default for the method'."""

    batch_size: int = 1
    seq_len: int = 2048
    precision: Precision | None = None
    optimizer: Optimizer | None = None
    grad_ckpt: bool | None = None
    attention: Attention | None = Field(None, description="None: what transformers uses for the architecture")
    loop: Loop = "trainer"
    tf32: bool = False
    sync_each_batch: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant_type: QuantType = "nf4"
    double_quant: bool = True


HALF_PRECISION_FALLBACK = {"bf16-mixed": "fp16-mixed", "bf16": "fp16"}  # for GPUs without bf16 (T4, V100)


def for_gpu(precision: str, bf16_supported: bool) -> str:
    """The precision a GPU runs `precision` in: bf16 becomes fp16 where there is no bf16 (same bytes)."""
    return precision if bf16_supported else HALF_PRECISION_FALLBACK.get(precision, precision)


def resolve(method: Method, choices: SetupChoices, *, bf16_supported: bool = True,
            model_type: str | None = None) -> TrainingSetup:
    """Complete `choices` for `method` with the Hugging Face recipe defaults.

    full: bf16 mixed precision (fp32 master weights, grads and AdamW states), fused AdamW, no checkpointing;
    lora: frozen base in bf16 under bf16 autocast, fp32 adapters, fused AdamW, no checkpointing;
    qlora: NF4 with double quantization, bf16 compute, paged 32-bit AdamW (the QLoRA recipe),
    gradient checkpointing on (prepare_model_for_kbit_training enables it).
    Without bf16 support (V100, T4) bf16 becomes fp16. The attention implementation defaults to what
    transformers uses for `model_type` (SDPA, eager for BLOOM).
    """
    precision = for_gpu(choices.precision or "bf16-mixed", bf16_supported)
    optimizer = choices.optimizer or DEFAULT_OPTIMIZER[method]
    grad_ckpt = choices.grad_ckpt if choices.grad_ckpt is not None else method == "qlora"
    return TrainingSetup(
        method=method, batch_size=choices.batch_size, seq_len=choices.seq_len, precision=precision,
        optimizer=optimizer, grad_ckpt=grad_ckpt, attention=attention_for(model_type or "", choices.attention),
        loop=choices.loop, tf32=choices.tf32, sync_each_batch=choices.sync_each_batch,
        lora=None if method == "full" else choices.lora, quant_type=choices.quant_type,
        double_quant=choices.double_quant,
    )
