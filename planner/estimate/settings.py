"""Training settings: what the user chose, completed with the defaults of the usual Hugging Face recipes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

Method = Literal["full", "lora", "qlora"]
Precision = Literal["bf16-mixed", "bf16", "fp16-mixed", "fp16", "fp32"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor"]
Attention = Literal["sdpa", "eager", "flash"]
QuantType = Literal["nf4", "fp4"]

METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
OPTIMIZERS: tuple[str, ...] = Optimizer.__args__  # type: ignore[attr-defined]
ATTENTIONS: tuple[str, ...] = Attention.__args__  # type: ignore[attr-defined]


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
    optimizer: Optimizer = "adamw"
    grad_ckpt: bool = False
    attention: Attention = "sdpa"
    lora: LoraSettings | None = None
    quant_type: QuantType = "nf4"
    double_quant: bool = True

    @field_validator("batch_size", "seq_len")
    @classmethod
    def _positive(cls, value: int, info) -> int:  # noqa: ANN001 - pydantic's ValidationInfo
        return _require_positive(value, info.field_name.replace("_", "-"))

    @model_validator(mode="after")
    def _lora_only_for_adapters(self) -> "TrainingSetup":
        if self.method == "full" and self.lora is not None:
            self.lora = None
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
    attention: Attention = "sdpa"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant_type: QuantType = "nf4"
    double_quant: bool = True


HALF_PRECISION_FALLBACK = {"bf16-mixed": "fp16-mixed", "bf16": "fp16"}  # for GPUs without bf16 (T4, V100)


def for_gpu(precision: str, bf16_supported: bool) -> str:
    """The precision a GPU runs `precision` in: bf16 becomes fp16 where there is no bf16 (same bytes)."""
    return precision if bf16_supported else HALF_PRECISION_FALLBACK.get(precision, precision)


def resolve(method: Method, choices: SetupChoices, *, bf16_supported: bool = True) -> TrainingSetup:
    """Complete `choices` for `method` with the Hugging Face recipe defaults.

    full: bf16 mixed precision (fp32 master weights, grads and AdamW states), no checkpointing;
    lora: frozen base in bf16, fp32 adapters, AdamW, no checkpointing;
    qlora: NF4 with double quantization, bf16 compute, paged 32-bit AdamW (the QLoRA recipe),
    gradient checkpointing on (prepare_model_for_kbit_training enables it).
    Without bf16 support (V100, T4) bf16 becomes fp16.
    """
    precision = for_gpu(choices.precision or "bf16-mixed", bf16_supported)
    optimizer = choices.optimizer or ("paged_adamw_32bit" if method == "qlora" else "adamw")
    grad_ckpt = choices.grad_ckpt if choices.grad_ckpt is not None else method == "qlora"
    return TrainingSetup(
        method=method, batch_size=choices.batch_size, seq_len=choices.seq_len, precision=precision,
        optimizer=optimizer, grad_ckpt=grad_ckpt, attention=choices.attention,
        lora=None if method == "full" else choices.lora, quant_type=choices.quant_type,
        double_quant=choices.double_quant,
    )
