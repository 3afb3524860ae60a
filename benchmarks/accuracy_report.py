"""ACCURACY.md from benchmarks/accuracy.py's results: a header, the method, and train and held-out tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from importlib.metadata import PackageNotFoundError, version

GIB = 2**30


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gib(value) -> str:
    return f"{value / GIB:.3f}" if value else "-"


def row(spec: dict, result: dict | None) -> str:
    """One table row; a case not measured (yet) or failed says so."""
    head = f"| {spec['id']} |"
    if result is None:
        return f"{head} not measured | | | | | | | | |"
    if "report" not in result:
        return f"{head} failed: {result['error'][:120]} | | | | | | | | |"
    report = result["report"]
    m = report["measured"]
    disagree = m.get("instruments_disagree_percent")
    flag = " **>2%**" if disagree is not None and disagree > 2 else ""
    return (f"{head} {_gib(report['estimated_compared_bytes'])} | {_gib(m['peak_allocated_bytes'])} | "
            f"{report['error_percent']:+.2f}% | {_first_error(report):+.2f}% | {_gib(m.get('peak_tracker_bytes'))} | "
            f"{_gib(m.get('peak_allocator_bytes'))} | {_gib(m.get('peak_rss_bytes'))} | "
            + (f"{disagree:.2f}%{flag}" if disagree is not None else "-")
            + f" | {_timing(report, result['wall'])} |")


def _first_error(report: dict) -> float:
    """The error of the estimate ftplan made when the case was measured (before any later estimate change)."""
    first = report.get("estimated_at_measurement_bytes", report["estimated_compared_bytes"])
    measured = report["measured"]["peak_allocated_bytes"]
    return 100 * (first - measured) / measured


def _timing(report: dict, wall: float) -> str:
    """Step seconds (tokens/s, and on CUDA the utilisation of the FLOPs ftplan counts) / the case's seconds."""
    m = report["measured"]
    util = f", utilisation {report['utilization']:.2f}" if report.get("utilization") is not None else ""
    return f"{m['step_seconds']:.2f} ({m['tokens_per_second']:,.1f} tok/s{util}) / {wall:.0f}"


def summary(results: list[dict]) -> str:
    """n, median and max |error|, how many within 3% and 5%; instrument agreement."""
    reports = [r["report"] for r in results if "report" in r]
    if not reports:
        return "no case measured"
    errors = [abs(r["error_percent"]) for r in reports]
    disagree = [r["measured"]["instruments_disagree_percent"] for r in reports
                if r["measured"].get("instruments_disagree_percent") is not None]
    text = (f"n = {len(errors)}, median |error| {statistics.median(errors):.2f}%, max {max(errors):.2f}%, "
            f"{sum(e <= 3 for e in errors)} within 3%, {sum(e <= 5 for e in errors)} within 5%")
    first = [abs(_first_error(r)) for r in reports]
    if any(abs(f - e) > 0.05 for f, e in zip(first, errors)):
        text += f"; as first measured: median {statistics.median(first):.2f}%, max {max(first):.2f}%"
    if disagree:
        text += (f"; instruments: median disagreement {statistics.median(disagree):.2f}%, max "
                 f"{max(disagree):.2f}%, {sum(d > 2 for d in disagree)} flagged (>2%)")
    return text


def table(title: str, matrix: list[dict], results: dict, chosen) -> list[str]:
    specs = [s for i, s in enumerate(matrix) if chosen(i)]
    got = [results[s["id"]] for s in specs if s["id"] in results]
    failed = sum("report" not in r for r in got)
    missing = f"{len(specs) - len(got) + failed} of {len(specs)} not measured" + (f", {failed} of them failed"
                                                                                     if failed else "")
    return [f"### {title}", "", f"**{summary(got)}** ({missing})" if len(got) - failed < len(specs)
            else f"**{summary(got)}**", "",
            "| case (model/layers/method/precision/optimizer/loop/batch x seq) | estimated GiB | measured GiB "
            "(reference) | error | error when measured | tracker GiB | allocator GiB | RSS GiB | instruments apart | "
            "step s (tokens/s) / case s |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *[row(s, results.get(s["id"])) for s in specs], ""]


def header(device: str, matrix_name: str, results: dict) -> list[str]:
    walls = [r["wall"] for r in results.values()]
    whens = [r["when"] for r in results.values() if "when" in r]
    utc = lambda t: datetime.datetime.fromtimestamp(t, datetime.UTC)  # noqa: E731
    # "when" is a case's start: the run spans the first start to the last end
    span = (f"{utc(min(whens)):%Y-%m-%d %H:%M} to {utc(max(r['when'] + r['wall'] for r in results.values())):%H:%M}"
            if whens else "-")
    fast = any(r.get("bench_cpu_bf16") for r in results.values())
    return [
        f"# Memory estimate accuracy ({device})", "",
        f"Generated by `python benchmarks/accuracy.py --device {device}"
        + (f" --matrix {matrix_name}" if matrix_name != device else "") + f"`, measured {span} UTC. "
        f"Host: {_cpu_name()}, {os.cpu_count()} CPUs ({platform.machine()}, shared with other work). "
        f"Python {platform.python_version()}, torch {_version('torch')}, transformers {_version('transformers')}, "
        f"peft {_version('peft')}, accelerate {_version('accelerate')}, bitsandbytes {_version('bitsandbytes')}. "
        f"{len(results)} cases run, {sum(walls) / 60:.1f} minutes of case time in all (some ran side by side)"
        + (" (bf16 matmuls and CPU flash attention through benchmarks/cpu_bf16.py's blocked fp32 kernels: this "
           "CPU has no AVX512-BF16/AMX)." if fast else "."), ""]


METHOD = """## Method

Each case is one `ftplan measure MODEL --device {device} --json ...` process: the model is built from its config
at its real width, heads and vocabulary (random weights, `--layers N` keeps N layers; `all` = full depth) by the
code the Hugging Face backend trains with, one warm-up step, then measured steps on random tokens. The estimate
is `ftplan estimate --device {device}` for the same setup (peak allocated bytes, plus paged optimizer states on
the CPU, which has no paged memory), recomputed with today's planner each time this file is written, so a case
measured before an estimate change is judged by the changed estimate; "error when measured" is the estimate of
that day (a held-out case that led to a change counts as seen from then on: both figures are shown). Error = (estimated - measured) / measured, measured = the reference
instrument.

Instruments on the CPU (planner/measure/instruments.py), each over its own step:
- **tracker**: a TorchDispatchMode that counts every live tensor storage (what ops return; not what an op
  allocates and frees inside itself).
- **allocator**: torch's profiler with `profile_memory=True`, i.e. every block the c10 CPU allocator hands out or
  takes back, intra-op buffers included (second of two profiled steps).
- **RSS** (the reference where measured): a child process started with glibc set to serve every allocation of
  64 KiB or more by mmap and to return freed memory at once (`MALLOC_MMAP_THRESHOLD_=65536
  MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0`), builds the same model, warm-up step, VmRSS, peak reset by
  writing 5 to /proc/self/clear_refs, one step, VmHWM. Independent of torch's bookkeeping.
"instruments apart" = (largest - smallest) / smallest over the instruments measured; over 2% is flagged.
Without RSS (`--no-rss`) the allocator is the reference.

Held-out rule, fixed before any result was seen: the case at 0-based position i of the first 26 cases of the
matrix is held out when i % 3 == 2; of the cases added later, the four QLoRA/full bf16-mixed cases (added after
the first held-out results, to test a change those suggested) are all train cases, and the 24-case architecture
family block is split by the same rule within the block (position % 3 == 2, methods rotated so each is held out
somewhere); the two MoE cases added with the change they test are train cases; the 9-case gradient
accumulation block (`--grad-accum 2-3`: optimizer steps over several micro-batches, where every gradient is held
through the later ones) is split by position within the block as well, fixed before any of it was measured.
Estimate changes were made only from train cases.
"""


def render(matrix: list[dict], results: dict, device: str, matrix_name: str, held_out, notes: str = "") -> str:
    """The whole markdown file; `notes` (hand-written: causes of misses, what was not measured) goes last."""
    lines = header(device, matrix_name, results)
    lines += [METHOD.format(device=device), "## Results", ""]
    lines += table("Train cases", matrix, results, lambda i: not held_out(i))
    lines += table("Held-out cases", matrix, results, held_out)
    lines += table("All cases", matrix, results, lambda i: True)[:3] + [""]
    misses = [s["id"] for s in matrix if s["id"] in results and "report" in results[s["id"]]
              and abs(results[s["id"]]["report"]["error_percent"]) > 3]
    lines += ["## Cases over 3%", "", *([f"- {m}" for m in misses] or ["none"]), ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines) + "\n"
