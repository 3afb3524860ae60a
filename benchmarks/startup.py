"""Cold-start latency of `ftplan estimate llama2-7b --method qlora`, and a check that the
estimate path imports no heavy library. Prints figures; it asserts nothing (timings flake on
shared machines). Target: median <= 200 ms on a 2-core machine.

Usage: python benchmarks/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

COMMAND = [sys.executable, "-m", "ftplan", "estimate", "llama2-7b", "--method", "qlora"]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def time_runs(runs: int) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(COMMAND, capture_output=True, check=True, env=env)  # warm the page cache and .pyc files
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(COMMAND, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports() -> tuple[list[str], list[tuple[str, int]]]:
    """Modules imported by the estimate path (python -X importtime), heavy ones and the slowest five."""
    result = subprocess.run([sys.executable, "-X", "importtime", *COMMAND[1:]], capture_output=True, text=True,
                            check=True)
    rows = []
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if match:
            rows.append((match.group(4), int(match.group(2))))
    heavy = sorted({name for name, _ in rows if name.split(".")[0] in HEAVY})
    top = sorted((r for r in rows if "." not in r[0]), key=lambda r: -r[1])[:5]
    return heavy, top


PHASES = """
import io, time
t0 = time.perf_counter()
import click, pydantic, rich.console, rich.table
class Warm(pydantic.BaseModel):  # pydantic imports its machinery lazily, on the first model class
    x: int
t1 = time.perf_counter()
from ftplan.estimate import report as estimate
from ftplan.render import estimate as render
from ftplan.model import resolve
from ftplan.estimate import settings
t2 = time.perf_counter()
report = estimate.estimate(resolve.resolve_model("llama2-7b"), ["qlora"], settings.SetupChoices())
t3 = time.perf_counter()
render.print_estimate(report, rich.console.Console(file=io.StringIO(), width=100, highlight=False))
t4 = time.perf_counter()
print(*(round(1000 * x) for x in (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))
"""


def phases(runs: int) -> list[int]:
    """Median ms, in fresh processes, of: third-party imports, ftplan's imports, estimate, render."""
    samples = [[int(x) for x in subprocess.run([sys.executable, "-c", PHASES], capture_output=True, text=True,
                                               check=True).stdout.split()] for _ in range(runs)]
    return [int(statistics.median(column)) for column in zip(*samples)]


def interpreter_start(runs: int) -> int:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    times = time_runs(args.runs)
    heavy, top = heavy_imports()
    print(f"command: ftplan {' '.join(COMMAND[3:])}")
    print(f"runs: {len(times)}, median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms (target: median <= 200 ms)")
    print(f"heavy imports on the estimate path: {', '.join(heavy) if heavy else 'none'}")
    print("slowest top-level imports (cumulative): " + ", ".join(f"{n} {us / 1000:.0f} ms" for n, us in top))
    libs, own, work, render = phases(args.runs)
    print(f"where the time goes (medians): interpreter start {interpreter_start(args.runs)} ms, "
          f"click+pydantic+rich imports (with pydantic's first model class) {libs} ms, "
          f"ftplan imports and model classes {own} ms, "
          f"estimate {work} ms, rendering {render} ms")


if __name__ == "__main__":
    main()
