"""Estimated against measured peak memory for a matrix of real-width models, written to ACCURACY.md.

Each case runs `ftplan measure ... --json` in its own process (so memory is returned between
cases) with the models at their real width and 2-4 layers, on the CPU by default.

Usage: python benchmarks/accuracy.py [--device cpu|cuda] [--only SUBSTRING] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (model, layers, method, extra flags). Widths, heads and vocabularies are the real ones.
CPU_MATRIX: list[tuple[str, int, str, list[str]]] = [
    ("llama2-7b", 2, "full", ["--seq-len", "512"]),
    ("llama2-7b", 2, "full", ["--precision", "bf16", "--batch-size", "2", "--seq-len", "256"]),
    ("llama2-7b", 2, "lora", ["--lora-targets", "q_proj,v_proj", "--lora-r", "8", "--seq-len", "2048"]),
    ("llama2-7b", 2, "lora", ["--lora-targets", "all-linear", "--lora-r", "64", "--batch-size", "4",
                              "--seq-len", "256", "--grad-ckpt"]),
    ("llama2-7b", 2, "lora", ["--attn", "eager", "--seq-len", "1024"]),
    ("llama2-7b", 2, "qlora", ["--seq-len", "1024"]),
    ("llama3-8b", 2, "lora", ["--lora-targets", "q_proj,v_proj", "--seq-len", "1024"]),
    ("llama3-8b", 2, "lora", ["--optimizer", "adamw_8bit", "--grad-ckpt", "--seq-len", "512"]),
    ("llama3-8b", 2, "qlora", ["--lora-targets", "all-linear", "--batch-size", "2", "--seq-len", "512"]),
    ("mistral-7b", 2, "full", ["--optimizer", "adamw_8bit", "--seq-len", "256"]),
    ("mistral-7b", 2, "lora", ["--lora-targets", "all-linear", "--lora-r", "32", "--batch-size", "8",
                               "--seq-len", "256"]),
    ("mistral-7b", 2, "qlora", ["--seq-len", "2048"]),
    ("qwen2.5-7b", 2, "lora", ["--lora-r", "8", "--seq-len", "1024"]),
    ("qwen2.5-7b", 2, "lora", ["--attn", "eager", "--seq-len", "512"]),
    ("qwen2.5-7b", 2, "qlora", ["--lora-targets", "all-linear", "--seq-len", "512"]),
    ("gemma-7b", 2, "lora", ["--seq-len", "512"]),
    ("gemma-7b", 2, "lora", ["--lora-targets", "all-linear", "--grad-ckpt", "--batch-size", "2", "--seq-len", "256"]),
    ("gemma-7b", 2, "qlora", ["--seq-len", "1024"]),
    ("phi3-mini", 2, "full", ["--seq-len", "512"]),
    ("phi3-mini", 4, "full", ["--precision", "bf16", "--grad-ckpt", "--batch-size", "4", "--seq-len", "256"]),
    ("phi3-mini", 4, "lora", ["--batch-size", "2", "--seq-len", "512"]),
    ("phi3-mini", 4, "qlora", ["--seq-len", "1024"]),
]

# On a GPU the models fit at full depth (7B/8B LoRA and QLoRA, a 1B-3B full fine-tune).
CUDA_MATRIX: list[tuple[str, int, str, list[str]]] = [
    ("llama3.2-1b", 16, "full", ["--seq-len", "2048"]),
    ("qwen2.5-3b", 36, "full", ["--precision", "bf16", "--seq-len", "1024"]),
    ("llama2-7b", 32, "lora", ["--seq-len", "2048"]),
    ("llama3-8b", 32, "lora", ["--lora-targets", "all-linear", "--grad-ckpt", "--batch-size", "4",
                               "--seq-len", "1024"]),
    ("llama3-8b", 32, "qlora", ["--seq-len", "2048"]),
    ("mistral-7b", 32, "qlora", ["--lora-targets", "all-linear", "--batch-size", "2", "--seq-len", "2048"]),
]


def settings_text(flags: list[str]) -> str:
    return " ".join(flags).replace("--", "")


def run_case(model: str, layers: int, method: str, flags: list[str], device: str) -> dict:
    command = [sys.executable, "-m", "ftplan", "measure", model, "--layers", str(layers), "--method", method,
               "--device", device, "--json", *flags]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1], "wall": wall}
    return {**json.loads(result.stdout), "wall": wall}


def row(case: tuple, result: dict) -> str:
    model, layers, method, flags = case
    head = f"| {model} | {layers} | {method} | {settings_text(flags) or 'defaults'} |"
    if "error" in result:
        return f"{head} - | - | failed: {result['error']} | |"
    est = result["estimated_compared_bytes"] / 2**20
    got = result["measured"]["peak_allocated_bytes"] / 2**20
    setup = result["setup"]
    return (f"{head} {setup['precision']}, {setup['optimizer']}, ckpt {'on' if setup['grad_ckpt'] else 'off'}, "
            f"{setup['attention']}, {setup['batch_size']}x{setup['seq_len']} | {est:,.0f} | {got:,.0f} | "
            f"{result['error_percent']:+.1f}% | {result['measured']['step_seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", default=None, help="run the cases whose model or method contains this")
    parser.add_argument("--out", default=None, help="default: benchmarks/ACCURACY.md (ACCURACY-GPU.md on cuda)")
    args = parser.parse_args()
    matrix = CUDA_MATRIX if args.device == "cuda" else CPU_MATRIX
    cases = [c for c in matrix if not args.only or args.only in f"{c[0]} {c[2]}"]
    out = Path(args.out) if args.out else HERE / ("ACCURACY-GPU.md" if args.device == "cuda" else "ACCURACY.md")
    start = time.perf_counter()
    rows, errors = [], []
    for case in cases:
        result = run_case(*case, args.device)
        rows.append(row(case, result))
        if "error_percent" in result:
            errors.append(abs(result["error_percent"]))
        print(rows[-1], f"({result['wall']:.0f} s)", flush=True)
    total = time.perf_counter() - start
    failed = len(cases) - len(errors)
    summary = (f"{len(errors)} cases measured, max |error| {max(errors, default=0):.1f}%, "
               f"mean |error| {sum(errors) / max(len(errors), 1):.1f}%, "
               f"{sum(e <= 5 for e in errors)} within 5%" + (f", {failed} failed" if failed else ""))
    text = "\n".join([
        f"# Memory estimate accuracy ({args.device})", "",
        f"Generated by `python benchmarks/accuracy.py --device {args.device}` on {datetime.date.today()} "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, peft {_version('peft')}, "
        f"bitsandbytes {_version('bitsandbytes')}), {total / 60:.1f} minutes.", "",
        "Peak allocated bytes of a steady-state training step (one warm-up step, then one measured step on "
        "random tokens), estimated by `ftplan estimate` and measured by `ftplan measure` on the same "
        "reduced-depth model (real widths, heads and vocabulary). On the CPU the peak is the high-water "
        "mark of live tensor storage; paged optimizer states count there (the CPU has no paged memory). "
        "Error = (estimated - measured) / measured.", "",
        f"**{summary}.**", "",
        "| model | layers | method | flags | setup | estimated MiB | measured MiB | error | step s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, "",
    ])
    out.write_text(text)
    print(f"{summary}; wrote {out}")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
