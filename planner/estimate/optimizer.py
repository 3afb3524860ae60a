"""Optimizer memory: the states it keeps, and the temporaries of its step, per Hugging Face optimizer name.

Names are `TrainingArguments.optim`'s. What each keeps and allocates while it steps (n: elements of one
trainable tensor, P: all trainable elements, s: bytes of a state element):

| optim                        | states                                  | step temporaries                          |
|------------------------------|-----------------------------------------|-------------------------------------------|
| adamw_torch_fused            | exp_avg + exp_avg_sq in the param dtype | none (one fused kernel, in place)         |
| adamw_torch                  | as above                                | CUDA: foreach, sqrt of every exp_avg_sq at once: s x P; CPU: a per-parameter loop, 2 x s x n of the largest |
| adamw_bnb_8bit, paged_adamw_8bit | blockwise 8-bit (2n + absmax), 32-bit below 4096 elements and for nn.Embedding (the Trainer's override) | CUDA: none (fused kernels); CPU: 20n (fp32 params) / 24n (half) for the largest 8-bit tensor, 12n / 16n on the 32-bit path |
| paged_adamw_32bit            | two fp32 states                         | CUDA: none; CPU: 12n / 16n of the largest |
| adafactor                    | fp32 factored row + column (full for vectors) | 8n (fp32 params) / 16n (half) of the largest |
| sgd (no momentum)            | none                                    | none                                      |

Sources: torch/optim/adam.py (_single_tensor_adam, _multi_tensor_adam), bitsandbytes/backends/cpu/ops.py
(_optimizer_update_8bit_blockwise_cpu, _optimizer_update_32bit_cpu), transformers' Adafactor.step and the
Trainer's GlobalOptimManager override for embeddings; each measured on the CPU against the RSS of the step
(benchmarks/ACCURACY.md).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from ftplan.estimate.settings import TrainingSetup

BNB_BLOCK = 256            # bitsandbytes blockwise 8-bit optimizer states: one fp32 absmax per 256 values
BNB_MIN_8BIT_NUMEL = 4096  # smaller tensors keep 32-bit states (bitsandbytes min_8bit_size)
EIGHT_BIT = ("adamw_bnb_8bit", "paged_adamw_8bit")
Device = Literal["cuda", "cpu"]


class Trainable(NamedTuple):
    """One trainable tensor as the optimizer sees it."""

    shape: tuple[int, ...]
    embedding: bool = False  # an nn.Embedding weight (the Trainer keeps its 8-bit states at 32 bits)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_bytes(setup: TrainingSetup) -> int:
    """Bytes of a trainable element: half precision only for pure bf16/fp16 full fine-tuning (adapters and
    mixed-precision master weights are fp32)."""
    return 2 if setup.method == "full" and setup.precision in ("bf16", "fp16") else 4


def _eight_bit(t: Trainable, setup: TrainingSetup) -> bool:
    return setup.optimizer in EIGHT_BIT and t.numel >= BNB_MIN_8BIT_NUMEL and not t.embedding


def state_bytes(tensors: list[Trainable], setup: TrainingSetup) -> int:
    """Optimizer state bytes for the trainable tensors (see the module's table)."""
    name, s = setup.optimizer, param_bytes(setup)
    total = 0
    for t in tensors:
        n = t.numel
        if name in ("adamw_torch_fused", "adamw_torch"):
            total += 2 * n * s
        elif name == "paged_adamw_32bit" or (name in EIGHT_BIT and not _eight_bit(t, setup)):
            total += 2 * n * 4
        elif name in EIGHT_BIT:
            total += 2 * n + 2 * math.ceil(n / BNB_BLOCK) * 4
        elif name == "adafactor":  # transformers creates its states in fp32 whatever the parameter dtype
            total += (sum(t.shape[-2:]) if len(t.shape) >= 2 else n) * 4
    return total


def step_transient(tensors: list[Trainable], setup: TrainingSetup, device: Device = "cuda") -> int:
    """Bytes the optimizer allocates while it steps, on top of weights, gradients and states."""
    if not tensors:
        return 0
    name, s = setup.optimizer, param_bytes(setup)
    half = s == 2
    largest = max(t.numel for t in tensors)
    if name == "adamw_torch":
        return s * sum(t.numel for t in tensors) if device == "cuda" else 2 * s * largest
    if name == "adafactor":
        return (16 if half else 8) * largest
    if device == "cuda":  # fused AdamW, bitsandbytes' fused CUDA kernels, sgd without momentum
        return 0
    if name in EIGHT_BIT:
        per = [(24 if half else 20) * t.numel if _eight_bit(t, setup) else (16 if half else 12) * t.numel
               for t in tensors]
        return max(per)
    if name == "paged_adamw_32bit":
        return (16 if half else 12) * largest
    return 0


def paged(setup: TrainingSetup) -> bool:
    """Paged optimizers keep their states in CUDA unified memory, outside the allocator's count."""
    return setup.optimizer.startswith("paged_")
