"""What a PEFT LoRA linear costs over the frozen linear it wraps, forward + backward, measured on one device.

The time model charges a LoRA target only its adapter FLOPs (x @ A @ B: 2 x r x (in + out) per token forward,
twice that backward) at the matmuls' rate, a few percent of the frozen layer's. Published LoRA runs of three
harnesses (fms-acceleration, optimum-benchmark, FlagPerf) run 20-30% slower than predicted where the same
benches' full fine-tuning rows do not (benchmarks/TIME-ACCURACY.md); the adapter path's dropout copy, dtype
casts, thin matmuls, scaling and add are the suspect. This times the path in isolation, so the miss can be
told apart from the rest of the step: for each shape, token count, rank, dropout and precision mode

  frozen   the base layer alone, its weight frozen (backward: the input gradient only)
  trained  the same layer with its weight trained (full fine-tuning: input and weight gradients)
  lora     get_peft_model's LoRA layer around the frozen one (the layer, called as a model calls it), as PEFT
           builds it by default (adapters upcast to
           fp32 beside a bf16 base, the input cast to them), or in bf16 (`bf16 adapters`), or under autocast

and prints the LoRA layer's time over the frozen one's beside the share the time model gives it (the adapter's
FLOPs over the frozen layer's), and the extra time as bytes per token and input feature at the GPU's catalogued
bandwidth. Figures, no assertions; results append to --results as JSON lines.

Usage: python benchmarks/lora_overhead.py [--device cuda|cpu] [--results PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

# (in_features, out_features): an attention projection and an MLP down projection of a Llama-3-8B layer
GPU_SHAPES = ((4096, 4096), (14336, 4096))
GPU_TOKENS = (2048, 8192, 16384)
CPU_SHAPES = ((256, 256), (512, 256))  # the rehearsal: every code path, small enough for seconds
CPU_TOKENS = (64, 256)
RANKS = (16, 64)
DROPOUTS = (0.0, 0.05)
MODES = ("bf16", "bf16 adapters", "bf16-mixed")  # PEFT's default adapters in a pure bf16 step; bf16 ones; autocast


def layers(in_f: int, out_f: int, rank: int, dropout: float, mode: str, device: str):
    """The frozen base layer, its trained twin, and PEFT's LoRA layer around a frozen copy."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    trained = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    holder = torch.nn.Sequential()
    holder.add_module("proj", torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"])
    wrapped = get_peft_model(holder, config, autocast_adapter_dtype=mode != "bf16 adapters")
    wrapped.train()
    # the LoRA layer itself, not the PeftModel around it: a model calls its layers, not the wrapper, per layer
    return base, trained, wrapped.base_model.model.proj


def seconds(step, device: str, iterations: int, warmup: int = 5, repeats: int = 3) -> float:
    """Wall time of one `step()`: the median over `repeats` runs of `iterations` steps back to back (CUDA events on
    a GPU). A layer alone cannot queue work as far ahead as a model does: where its kernels are shorter than their
    launches (the smallest token counts), the figure includes host time a training step hides."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iterations):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iterations)
        else:
            began = time.perf_counter()
            for _ in range(iterations):
                step()
            times.append((time.perf_counter() - began) / iterations)
    return statistics.median(times)


def forward_backward(module, x, grad, autocast: bool):
    """One training pass of `module` over `x`: gradients reset as zero_grad(set_to_none=True) leaves them."""
    import torch

    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        out.backward(grad.to(out.dtype))
    return step


def measure(in_f: int, out_f: int, tokens: int, rank: int, dropout: float, mode: str, device: str,
            iterations: int) -> dict:
    """One configuration's three timings, and the time model's share for the adapter."""
    import torch

    base, trained, lora = layers(in_f, out_f, rank, dropout, mode, device)
    x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_f, device=device, dtype=torch.bfloat16)
    autocast = mode == "bf16-mixed"
    times = {name: seconds(forward_backward(m, x, grad, autocast), device, iterations)
             for name, m in (("frozen", base), ("trained", trained), ("lora", lora))}
    # the time model: adapter FLOPs (forward 2r(in+out), backward twice that) over the frozen layer's (4 in out)
    model_share = 6 * rank * (in_f + out_f) / (4 * in_f * out_f)
    return {"device": device, "in_features": in_f, "out_features": out_f, "tokens": tokens, "rank": rank,
            "dropout": dropout, "mode": mode, **{f"{k}_seconds": v for k, v in times.items()},
            "lora_over_frozen": times["lora"] / times["frozen"] - 1, "model_share": model_share}


def bandwidth(device: str) -> tuple[str, float | None]:
    """The device's name and its catalogued memory bandwidth in bytes/s (None: a CPU, or not catalogued)."""
    if device != "cuda":
        return "cpu", None
    import torch

    from ftplan.data.calibration import gpu_for_device

    name = torch.cuda.get_device_name()
    gpu = gpu_for_device(name, torch.cuda.get_device_properties(0).total_memory)  # as `ftplan measure` finds it
    return name, gpu.memory_bandwidth_gbps * 1e9 if gpu else None


def table(rows: list[dict], bytes_per_s: float | None) -> str:
    """The results as a markdown table: milliseconds, the LoRA layer's extra time, and the model's share."""
    head = ("| in x out | tokens | r | dropout | mode | frozen ms | trained ms | LoRA ms | LoRA over frozen | "
            "model's share | extra bytes per token x in |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        extra = r["lora_seconds"] - r["frozen_seconds"]
        per_element = f"{extra * bytes_per_s / (r['tokens'] * r['in_features']):.0f}" if bytes_per_s else "-"
        lines.append(f"| {r['in_features']} x {r['out_features']} | {r['tokens']} | {r['rank']} | {r['dropout']} | "
                     f"{r['mode']} | {r['frozen_seconds'] * 1e3:.3f} | {r['trained_seconds'] * 1e3:.3f} | "
                     f"{r['lora_seconds'] * 1e3:.3f} | {r['lora_over_frozen']:+.0%} | {r['model_share']:.1%} | "
                     f"{per_element} |")
    return "\n".join(lines)


def main() -> None:
    """Every configuration of the device's grid, each row printed and appended to --results as it is measured (a
    run stopped at a time limit keeps what it measured), then the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--iterations", type=int, default=10, help="steps per timed run (3 runs)")
    parser.add_argument("--results", type=Path, default=None, help="append the rows here as JSON lines")
    args = parser.parse_args()
    shapes, token_counts = (GPU_SHAPES, GPU_TOKENS) if args.device == "cuda" else (CPU_SHAPES, CPU_TOKENS)
    name, bytes_per_s = bandwidth(args.device)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
    print(f"LoRA layer against the frozen layer it wraps, forward + backward, on {name}"
          + (f" ({bytes_per_s / 1e9:.0f} GB/s catalogued)" if bytes_per_s else ""), flush=True)
    rows = []
    for (in_f, out_f), tokens, rank, dropout, mode in itertools.product(shapes, token_counts, RANKS, DROPOUTS,
                                                                         MODES):
        rows.append({"gpu": name, **measure(in_f, out_f, tokens, rank, dropout, mode, args.device,
                                            args.iterations)})
        print(table(rows[-1:], bytes_per_s).splitlines()[-1], flush=True)
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows, bytes_per_s))
    shares = [r["lora_over_frozen"] for r in rows]
    print(f"LoRA over frozen: median {statistics.median(shares):+.0%}, range {min(shares):+.0%} to "
          f"{max(shares):+.0%}; the time model's share: {min(r['model_share'] for r in rows):.1%}-"
          f"{max(r['model_share'] for r in rows):.1%}")


if __name__ == "__main__":
    main()
