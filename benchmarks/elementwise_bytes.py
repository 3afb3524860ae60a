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

Results (2026-12-01, transformers 5.17, torch 2.13 CPU): 209 bytes under bf16 autocast, 157 in pure bf16 and 221
in fp32, identical at hidden 512 and 1024. fp32 moves only 1.06x autocast's traffic (not 2x: Llama's norms and
autocast already compute in fp32). The MLP adds about 9 bytes per unit of intermediate / hidden: 196, 210, 252
(autocast) at 2, 3.5 and 8, so a Gemma-like 8x MLP moves 1.20x a Llama layer's bytes. Eager attention adds, per
score, 25.0 (autocast) or 28.5 (pure bf16) bytes in the forward and 28.0 in the backward over SDPA: the
eager_attention constants.
"""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftplan.data import catalog

# Llama-3-8B's proportions (intermediate 3.5 x hidden, 4 query heads per kv head, head dim 128) at an eighth
# and a quarter of its width: the time model takes the bytes per token to grow with the hidden size
WIDTHS = (512, 1024)
MLP_RATIOS = (2.0, 3.5, 8.0)


def shape(hidden: int, mlp_ratio: float = 3.5) -> dict:
    return {"hidden_size": hidden, "intermediate_size": int(hidden * mlp_ratio), "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 512, "vocab_size": 512, "max_position_embeddings": 4096}


BATCH, SEQS = 2, (256, 512)  # micro-batch, and the two sequence lengths
COUNTED_BY_FLOPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product", "linear")
# ops that move no data though torch does not flag them as views (_unsafe_view: the reshape after a 3-D matmul)
NO_DATA = ("detach", "alias", "_unsafe_view")


class Traffic(TorchDispatchMode):
    """Bytes read and written by every data-moving op that is not a matmul or attention."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and not name.startswith(COUNTED_BY_FLOPS) and name not in NO_DATA:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def step_bytes(hidden: int, layers: int, precision: str, seq: int, mlp_ratio: float = 3.5,
               attention: str = "sdpa") -> dict[str, int]:
    """Elementwise bytes of one training step (no checkpointing) of a `layers`-deep model, its forward and its
    backward apart, full fine-tuning: fp32 weights under bf16 autocast ('bf16-mixed'), bf16 weights ('bf16') or
    fp32 weights and no autocast ('fp32')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, attn_implementation=attention, **shape(hidden, mlp_ratio))
    model = LlamaForCausalLM(config)  # fp32 weights: 'bf16-mixed' and 'fp32'
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (BATCH, seq))
    forward, backward = Traffic(), Traffic()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        with forward:
            loss = model(input_ids=ids, labels=ids).loss
        with backward:
            loss.backward()
    return {"forward": forward.bytes, "backward": backward.bytes}


def counted_bytes(hidden: int, precision: str, mlp_ratio: float = 3.5) -> tuple[list[float], float]:
    """Elementwise bytes per layer and step at each of SEQS, and per token, layer, hidden unit and pass."""
    passes = 3  # forward 1, backward about 2 forward-equivalents, as the time model counts them
    per_layer = [(sum(step_bytes(hidden, 4, precision, s, mlp_ratio).values())
                  - sum(step_bytes(hidden, 2, precision, s, mlp_ratio).values())) / 2 for s in SEQS]
    per_token = (per_layer[1] - per_layer[0]) / (BATCH * (SEQS[1] - SEQS[0]))
    return per_layer, per_token / (hidden * passes)


def eager_bytes_per_score(hidden: int, precision: str) -> dict[str, float]:
    """Bytes per attention score (query head x query x key) that eager attention adds to SDPA in the forward and
    in the backward: the part of the per-layer difference that grows with the square of the sequence length."""
    steps = {(attention, layers, s): step_bytes(hidden, layers, precision, s, attention=attention)
             for attention in ("eager", "sdpa") for layers in (4, 2) for s in SEQS}  # each step run once
    out = {}
    for phase in ("forward", "backward"):
        per_layer = {attention: [(steps[attention, 4, s][phase] - steps[attention, 2, s][phase]) / 2 for s in SEQS]
                     for attention in ("eager", "sdpa")}
        extra = [e - s for e, s in zip(per_layer["eager"], per_layer["sdpa"])]  # a x S + b x S^2 at each length
        (s1, s2), (d1, d2) = SEQS, extra
        b = (d2 / s2 - d1 / s1) / (s2 - s1)
        out[phase] = b / (BATCH * shape(hidden)["num_attention_heads"])
    return out


def main() -> int:
    rules = catalog.throughput()
    fitted = rules.elementwise.bytes_per_hidden
    print(f"Llama layers with Llama-3-8B's proportions, micro-batch {BATCH} x {SEQS[0]} and x {SEQS[1]} tokens; "
          f"fitted constant {fitted:g} bytes per token, layer, hidden unit and pass")
    print("| hidden | precision | per layer and step at each length, MB | counted bytes per token, layer, hidden "
          "unit, pass | counted / fitted |")
    print("|---|---|---|---|---|")
    for hidden in WIDTHS:
        for precision in ("bf16-mixed", "bf16", "fp32"):
            per_layer, counted = counted_bytes(hidden, precision)
            print(f"| {hidden} | {precision} | {per_layer[0] / 1e6:.0f}, {per_layer[1] / 1e6:.0f} | {counted:.1f} | "
                  f"{counted / fitted:.2f} |")
    # the time model's form scales with the hidden size alone; the MLP's activation and gating scale with its
    # width, which differs between families (GPT-2 4x, Llama 2.7-3.5x, Gemma 8x)
    print(f"\nMLP width (intermediate / hidden) at hidden {WIDTHS[0]}, counted bytes per token, layer, hidden unit, "
          "pass")
    print("| intermediate / hidden | bf16-mixed | bf16 |")
    print("|---|---|---|")
    for ratio in MLP_RATIOS:
        row = [counted_bytes(WIDTHS[0], precision, ratio)[1] for precision in ("bf16-mixed", "bf16")]
        print(f"| {ratio:g} | {row[0]:.1f} | {row[1]:.1f} |")
    eager = rules.eager_attention
    print(f"\nEager attention over SDPA at hidden {WIDTHS[0]}, bytes per score (head x query x key); catalogued "
          f"forward {eager.forward_bytes_per_score:g}, backward {eager.backward_bytes_per_score:g}")
    print("| precision | forward | backward |")
    print("|---|---|---|")
    for precision in ("bf16-mixed", "bf16"):
        row = eager_bytes_per_score(WIDTHS[0], precision)
        print(f"| {precision} | {row['forward']:.1f} | {row['backward']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
