"""Latency of `ftplan recommend llama2-7b` over the whole instance catalog, all three methods.

Prints figures; asserts nothing (timings flake on shared machines). Target: median < 300 ms for
the whole command on a 2-core machine.

Usage: python benchmarks/recommend.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMAND = [sys.executable, "-m", "ftplan", "recommend", "llama2-7b", "--tokens", "20000000", "--json"]

IN_PROCESS = """
import time
t0 = time.perf_counter()
from ftplan.data import dataset
from ftplan.estimate import report as estimate
from ftplan.recommend import search as recommend
from ftplan.model import resolve
from ftplan.estimate import settings
spec = resolve.resolve_model("llama2-7b")
layout = estimate.layout_for(spec)[0]
t1 = time.perf_counter()
rec = recommend.search(spec, layout, dataset.from_token_count(20_000_000, 2048), recommend.SearchRequest(),
                       settings.SetupChoices())
t2 = time.perf_counter()
from ftplan.run import registry as plugins
plugins.registry()
t3 = time.perf_counter()
print(round(1000 * (t1 - t0)), round(1000 * (t2 - t1)), round(1000 * (t3 - t2)), rec.evaluated,
      sum(rec.rejections.values()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FTPLAN_HOME": tempfile.mkdtemp()}
    subprocess.run(COMMAND, capture_output=True, check=True, env=env)  # warm caches
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(COMMAND, capture_output=True, check=True, env=env)
        times.append(time.perf_counter() - start)
    samples = [[int(x) for x in subprocess.run([sys.executable, "-c", IN_PROCESS], capture_output=True, text=True,
                                               check=True, env=env).stdout.split()] for _ in range(args.runs)]
    imports, search, loading, evaluated, dropped = (int(statistics.median(c)) for c in zip(*samples))
    print(f"command: ftplan {' '.join(COMMAND[3:])}")
    print(f"runs: {len(times)}, median {statistics.median(times) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms (target: median < 300 ms)")
    print(f"in-process medians: imports + model resolution {imports} ms, search {search} ms "
          f"({evaluated} plans timed and priced, {dropped} settings x instances dropped, most by memory), "
          f"plugin loading (entry-point scan) {loading} ms")


if __name__ == "__main__":
    main()
