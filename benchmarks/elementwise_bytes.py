"""A second measure of the time model's elementwise constant: the bytes that eager PyTorch's non-matmul kernels
read and write in a transformers Llama layer, counted op by op, against the value fitted to published runs.

catalogs/throughput.json's `elementwise.bytes_per_hidden` is fitted to step times: it says how many bytes per
token, layer and hidden unit each forward-equivalent pass moves at full memory bandwidth. Here every aten op of
one training step is intercepted (TorchDispatchMode) and the bytes of its tensor inputs and outputs summed,
leaving out the matmuls and attention (the FLOP count's), views (no data moves) and the optimizer. The per-layer
bytes come from the difference between a 4-layer and a 2-layer model, so the embedding, head and loss cancel;
the per-token bytes from the difference between two sequence lengths, so what moves once per step whatever
the tokens (autocast's weight casts, the gradients' casts: the time model's t_half term) cancels too.
The counted traffic assumes each byte moves once at peak bandwidth; the fitted constant also absorbs how far
below peak those kernels run, so counted / fitted is the bandwidth efficiency the fit implies.

Usage: python benchmarks/elementwise_bytes.py        (about a minute on two cores)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
# Llama-3-8B's proportions (intermediate 3.5 x hidden, 4 query heads per kv head, head dim 128) at an eighth
# and a quarter of its width: the time model takes the bytes per token to grow with the hidden size
WIDTHS = (512, 1024)


def shape(hidden: int) -> dict:
    return {"hidden_size": hidden, "intermediate_size": hidden * 7 // 2, "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 512, "vocab_size": 512, "max_position_embeddings": 4096}
BATCH, SEQS = 2, (256, 512)  # micro-batch, and the two sequence lengths
COUNTED_BY_FLOPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "linear")


class Traffic(TorchDispatchMode):
    """Bytes read and written by every data-moving op that is not a matmul or attention."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith(COUNTED_BY_FLOPS) and name not in ("detach", "alias"):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def step_bytes(hidden: int, layers: int, precision: str, seq: int) -> int:
    """Elementwise bytes of one training step (forward and backward, no checkpointing) of a `layers`-deep model,
    full fine-tuning: fp32 weights under bf16 autocast ('bf16-mixed') or bf16 weights ('bf16')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **shape(hidden))
    model = LlamaForCausalLM(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (BATCH, seq))
    counter = Traffic()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return counter.bytes


def main() -> int:
    fitted = json.loads((ROOT / "catalogs" / "throughput.json").read_text())["elementwise"]["bytes_per_hidden"]
    passes = 3  # forward 1, backward about 2 forward-equivalents, as the time model counts them
    print(f"Llama layers with Llama-3-8B's proportions, micro-batch {BATCH} x {SEQS[0]} and x {SEQS[1]} tokens; "
          f"fitted constant {fitted:g} bytes per token, layer, hidden unit and pass")
    print("| hidden | precision | per layer and step at each length, MB | counted bytes per token, layer, hidden "
          "unit, pass | counted / fitted |")
    print("|---|---|---|---|---|")
    for hidden in WIDTHS:
        for precision in ("bf16-mixed", "bf16"):
            per_layer = [(step_bytes(hidden, 4, precision, s) - step_bytes(hidden, 2, precision, s)) / 2
                         for s in SEQS]
            per_token = (per_layer[1] - per_layer[0]) / (BATCH * (SEQS[1] - SEQS[0]))
            counted = per_token / (hidden * passes)
            print(f"| {hidden} | {precision} | {per_layer[0] / 1e6:.0f}, {per_layer[1] / 1e6:.0f} | {counted:.1f} | "
                  f"{counted / fitted:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
