"""Estimated per-GPU memory against the peak GPU memory that published training runs report, written to
benchmarks/MEMORY-PUBLISHED.md.

benchmarks/ACCURACY.md checks the memory model on the CPU, with instruments of ftplan's own; CUDA kernels, the
caching allocator and the CUDA context can differ, and no GPU has been lent to this project. These are
measurements ftplan did not make: the runs of benchmarks/published_runs.jsonl whose sources state a peak GPU
memory (`memory_measured`, each with what was measured):

  torch_max_allocated  torch.cuda.max_memory_allocated: against the estimate's peak allocated
  device_used          the device's used memory (nvidia-smi or the like: the allocator's cache and the CUDA context
                       in it): against the GPU memory the estimate says a run needs
  unstated             the source does not say how: against the GPU memory the estimate says a run needs

A figure's `known_cause` says why it misses, where that was found; the report lists them.

Each run is estimated with its settings as the time comparison records them (benchmarks/time_runs.py), sharded
as `estimate --gpus N --sharding S` shards it. The memory model was not fitted to, or changed for, any of these
figures: every one is held out.

Usage: python benchmarks/memory_published.py [--check]   (--check: exit 1 if MEMORY-PUBLISHED.md is stale)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_runs as runs  # noqa: E402 - benchmarks/ is not a package

from ftplan.estimate.sharding import ShardedMemory, shard  # noqa: E402

REPORT = Path(__file__).resolve().parent / "MEMORY-PUBLISHED.md"
CATALOG = Path(__file__).resolve().parents[1] / "catalogs" / "memory_validation.json"
GiB = 2**30
BASES = {"torch_max_allocated": ("torch.cuda.max_memory_allocated", "peak allocated"),
         "device_used": ("the device's used memory (allocator cache and CUDA context included)", "GPU memory needed"),
         "unstated": ("not stated by the source", "GPU memory needed")}


def estimated(case: runs.Case) -> ShardedMemory:
    """Per-GPU memory of a published run, as `estimate` gives it for the run's GPUs and sharding."""
    p = case.parallel
    return shard(case.layout, case.setup, case.memory, gpus=p.gpus, nodes=p.count, sharding=p.sharding)


def comparisons(cases: list[runs.Case]) -> list[dict]:
    """One row per published memory figure: the measured bytes, the estimate's comparable figure, the error."""
    rows = []
    for case in cases:
        if not case.used or not case.rec.get("memory_measured"):
            continue
        memory = estimated(case)
        for figure in case.rec["memory_measured"]:
            if figure["basis"] not in BASES:
                raise ValueError(f"{case.id}: memory_measured basis {figure['basis']!r} is not one of {list(BASES)}")
            ours = memory.peak_allocated_bytes if figure["basis"] == "torch_max_allocated" else memory.required_bytes
            rows.append({"case": case, "basis": figure["basis"], "measured": figure["bytes"], "estimated": ours,
                         "error": ours / figure["bytes"] - 1, "quote": f"{figure['quote']} ({figure['reading']})",
                         "per_gpu_from": figure.get("per_gpu_from"), "cause": figure.get("known_cause")})
    return rows


def summary(rows: list[dict]) -> str:
    """n, median and largest |error|, how many within 5% and 10%, and how many under-estimated."""
    errors = [abs(r["error"]) for r in rows]
    under = sum(r["error"] < 0 for r in rows)
    return (f"n = {len(rows)}, median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}, "
            f"{sum(e <= 0.05 for e in errors)} within 5%, {sum(e <= 0.10 for e in errors)} within 10%, "
            f"{under} under-estimated")


def _setting(case: runs.Case) -> str:
    s, p = case.setup, case.parallel
    lora = f" r{s.lora.r}" if s.method != "full" else ""
    where = f"{p.gpus} x {case.gpu.name}" + (f", {p.sharding}" if p.gpus > 1 or p.sharding != "none" else "")
    return (f"{runs.display_name(case.rec['model'])} {s.method}{lora}, {s.precision}, {s.optimizer}, "
            f"{'ckpt' if s.grad_ckpt else 'no ckpt'}, {s.loop} loop, {s.batch_size} x {case.tokens_per_sequence:.0f}"
            f" tokens; {where}")


def table(rows: list[dict]) -> list[str]:
    """One line per figure, the estimate furthest under first."""
    lines = ["| run | setting | measured GiB | estimated GiB | error | the source's figure |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["error"]):
        quote = r["quote"] + (f"; {r['per_gpu_from']}" if r["per_gpu_from"] else "")
        lines.append(f"| {r['case'].id} | {_setting(r['case'])} | {r['measured'] / GiB:.2f} | "
                     f"{r['estimated'] / GiB:.2f} | {r['error']:+.1%} | {quote} |")
    return lines


def by_group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The torch-allocated figures by method and by the sharding of their runs ('none': one GPU)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["basis"] == "torch_max_allocated":
            groups.setdefault((r["case"].setup.method, r["case"].parallel.sharding), []).append(r)
    return dict(sorted(groups.items()))


def gap_per_token(chosen: list[dict]) -> list[float]:
    """KiB per token by which measured minus estimated grows with the micro-batch: for each model and setting
    measured at more than one micro-batch, between its smallest and largest (positive: under-estimated)."""
    settings: dict[tuple, list[dict]] = {}
    for r in chosen:
        c, s = r["case"], r["case"].setup
        same_but_batch = (runs.display_name(c.rec["model"]), s.method, s.precision, s.optimizer, s.grad_ckpt,
                          c.parallel.gpus, c.parallel.sharding, c.tokens_per_sequence)
        settings.setdefault(same_but_batch, []).append(r)
    slopes = []
    for same in settings.values():
        if len({r["case"].tokens_per_micro_batch for r in same}) > 1:
            low, high = (f(same, key=lambda r: r["case"].tokens_per_micro_batch) for f in (min, max))
            gap = (high["measured"] - high["estimated"]) - (low["measured"] - low["estimated"])
            slopes.append(gap / (high["case"].tokens_per_micro_batch - low["case"].tokens_per_micro_batch) / 1024)
    return sorted(slopes)


def device_over_allocated(rows: list[dict]) -> tuple[list[float], list[float]]:
    """For runs that report both: the device's used memory over the allocated peak, in GiB and as a share."""
    allocated = {r["case"].id: r["measured"] for r in rows if r["basis"] == "torch_max_allocated"}
    pairs = [(r["measured"], allocated[r["case"].id]) for r in rows
             if r["basis"] == "device_used" and r["case"].id in allocated]
    return sorted((d - a) / GiB for d, a in pairs), sorted(d / a - 1 for d, a in pairs)


def catalog_groups(rows: list[dict], date: str) -> dict:
    """catalogs/memory_validation.json: per method and sharding, how the allocated peaks of published runs compare
    with the estimate (measured / estimated), for `estimate` to show beside its figures."""
    groups = []
    for (method, sharding), chosen in by_group(rows).items():
        ratios = [r["measured"] / r["estimated"] for r in chosen]
        groups.append({"method": method, "sharding": sharding, "runs": len(chosen),
                       "measured_over_estimated": [round(min(ratios), 3), round(max(ratios), 3)],
                       "sources": sorted({r["case"].rec["source_short"] for r in chosen}),
                       "models": sorted({runs.display_name(r["case"].rec["model"]) for r in chosen})})
    return {"schema": 1, "date": date,
            "about": "Peak allocated GPU memory (torch.cuda.max_memory_allocated) of published training runs over "
                     "ftplan's estimate of it for their settings, by method and sharding; none of it was used to fit "
                     "the memory model",
            "source": "benchmarks/MEMORY-PUBLISHED.md, written by benchmarks/memory_published.py from the "
                      "memory_measured figures of benchmarks/published_runs.jsonl (each with its quote)",
            "groups": groups}


def groups_table(rows: list[dict]) -> list[str]:
    """Torch-allocated figures by method and sharding: where the model is off, which way, and how the gap grows
    with the micro-batch."""
    lines = ["| method | runs of | n | errors | gap per added token, KiB |", "|---|---|---|---|---|"]
    for (method, sharding), chosen in by_group(rows).items():
        errs = ", ".join(f"{e:+.1%}" for e in sorted(r["error"] for r in chosen))
        slopes = ", ".join(f"{k:+.1f}" for k in gap_per_token(chosen)) or "-"
        lines.append(f"| {method} | {'one GPU' if sharding == 'none' else sharding} | {len(chosen)} | {errs} | "
                     f"{slopes} |")
    return lines


def report(rows: list[dict], date: str) -> str:
    """MEMORY-PUBLISHED.md: the method, a section per basis, the allocated figures by method and sharding, causes."""
    sources = sorted({r["case"].rec["source_short"] for r in rows})
    out = ["# Memory against published runs", "",
           f"Generated {date} by `python benchmarks/memory_published.py` (ftplan's current memory model).", "",
           "Peak GPU memory as published runs report it, against ftplan's per-GPU estimate for the run's settings "
           f"({len(rows)} figures from {len({r['case'].id for r in rows})} runs: {', '.join(sources)}). Measurements "
           "ftplan did not make, on the GPUs this project has never been lent: the independent check of the CUDA "
           "side of the memory model (benchmarks/ACCURACY.md checks it on the CPU). None of these figures was used "
           "to fit or change the model. Error = (estimated - measured) / measured; an under-estimate is the "
           "dangerous side (a plan that does not fit).", ""]
    gib, share = device_over_allocated(rows)
    reserve = (f"Where a run reports both, the device used {gib[0]:.1f}-{gib[-1]:.1f} GiB ({share[0]:.0%}-"
               f"{share[-1]:.0%}) more than the allocated peak; ftplan assumes 5% slack and a 512 MiB context.")
    for basis, (what, ours) in BASES.items():
        chosen = [r for r in rows if r["basis"] == basis]
        if chosen:
            out += [f"## Measured: {what}; compared with the estimate's {ours}", "",
                    f"**{summary(chosen)}**", "", *([reserve, ""] if basis == "device_used" else []),
                    *table(chosen), ""]
    out += ["## torch.cuda.max_memory_allocated by method and sharding", "",
            "Gap per added token: how measured minus estimated grows between the smallest and largest micro-batch of "
            "one model and setting (positive: the estimate falls further short).", "", *groups_table(rows), ""]
    causes = {r["cause"]: [] for r in rows if r["cause"]}
    for r in rows:
        if r["cause"]:
            causes[r["cause"]].append(f"{r['case'].id} ({r['error']:+.1%})")
    if causes:
        out += ["## Causes found", "", *(f"- {', '.join(ids)}: {cause}" for cause, ids in causes.items()),
                "", "Every other miss is unexplained so far.", ""]
    return "\n".join(out)


def main() -> None:
    """Write the report and the catalog, or with --check exit 1 when either is not what today's model gives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed report is not current")
    args = parser.parse_args()
    rows = comparisons(runs.load())
    if args.check:
        committed = REPORT.read_text(encoding="utf-8")
        if "Generated " not in committed:
            sys.exit(f"{REPORT.name} has no 'Generated' line: run python benchmarks/memory_published.py")
        date = committed.split("Generated ", 1)[1].split(" ", 1)[0]
        stale = [p.name for p, now in ((REPORT, report(rows, date)),
                                       (CATALOG, json.dumps(catalog_groups(rows, date), indent=2)))
                 if now.rstrip("\n") != p.read_text(encoding="utf-8").rstrip("\n")]
        if stale:
            sys.exit(f"{', '.join(stale)} stale: run python benchmarks/memory_published.py")
        return
    date = datetime.date.today().isoformat()
    REPORT.write_text(report(rows, date).rstrip("\n") + "\n", encoding="utf-8")
    CATALOG.write_text(json.dumps(catalog_groups(rows, date), indent=2) + "\n", encoding="utf-8")
    for basis in BASES:
        if chosen := [r for r in rows if r["basis"] == basis]:
            print(f"{basis}: {summary(chosen)}")


if __name__ == "__main__":
    main()
