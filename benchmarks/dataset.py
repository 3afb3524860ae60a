"""Data of any size: peak RSS and time of `ftplan recommend --dataset` (sampled, and every line counted) and
`ftplan run --max-steps 1` on generated 100 MB and 1 GB JSONL files, with the tiny model of
examples/tiny_model.py. Figures, not a test: run it by hand and copy them into the README.

Usage: python benchmarks/dataset.py [--sizes 100M,1G] [--skip-exact] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import tiny_model  # noqa: E402


def generate(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of JSONL: lines of 20-400 words drawn from a pool of 20,000 random lines, so generating
    1 GB takes seconds, while every block of the file still differs."""
    rng = random.Random(seed)
    words = tiny_model.WORDS
    pool = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randrange(20, 400)))}) + "\n"
            for _ in range(20000)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            block = "".join(rng.choices(pool, k=2000))
            f.write(block)
            written += len(block)


def measure(args: list[str], cwd: Path) -> tuple[float, int, int, str]:
    """(seconds, peak RSS in bytes, exit code, stdout) of `ftplan ARGS` in a fresh process (os.wait4 gives that
    one child's resource usage)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "ftplan", *args], cwd=cwd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read().strip()
    if code:
        print(f"  ftplan {' '.join(args[:2])} failed: {errors.splitlines()[-1] if errors else code}")
    return seconds, usage.ru_maxrss * 1024, code, text


def row(label: str, seconds: float, rss: int, note: str = "") -> None:
    print(f"  {label:<34} {seconds:8.1f} s   peak RSS {rss / 2**20:8.0f} MiB   {note}")


def bench(directory: Path, size_label: str, size: int, exact: bool) -> None:
    data = directory / f"data-{size_label}.jsonl"
    began = time.perf_counter()
    generate(data, size)
    lines = sum(1 for _ in open(data, "rb"))
    print(f"\n{size_label}: {data.stat().st_size / 1e6:,.0f} MB, {lines:,} lines (generated in "
          f"{time.perf_counter() - began:.0f} s)")
    common = ["recommend", "./tiny", "--dataset", data.name, "--seq-len", "256", "--global-batch", "4",
              "--batch-size", "1", "--methods", "lora", "--max-gpus", "1", "--json"]
    s, rss, rc, out = measure([*common, "--count", "sample", "--yes", "--force", "-o", f"plan-{size_label}.yaml"],
                               directory)
    sampled = json.loads(out)["data"] if rc == 0 else {}
    row("recommend --dataset (sampled)", s, rss, f"tokens {sampled.get('tokens', 0):,} "
        f"+-{sampled.get('error_percent')}% (95%)")
    if exact:
        s, rss, rc, out = measure([*common, "--count", "exact"], directory)
        counted = json.loads(out)["data"] if rc == 0 else {}
        off = 100 * (sampled.get("tokens", 0) - counted.get("tokens", 1)) / max(1, counted.get("tokens", 1))
        row("recommend --dataset (every line)", s, rss, f"tokens {counted.get('tokens', 0):,}; the sample was "
            f"off by {off:+.2f}%")
    s, rss, rc, _ = measure(["run", f"plan-{size_label}.yaml", "--data", data.name, "--output", f"out-{size_label}",
                              "--max-steps", "1", "--json"], directory)
    row("run --max-steps 1", s, rss, "exit 0" if rc == 0 else f"exit {rc}")
    data.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100M,1G", help="comma-separated sizes: 100M, 1G, ...")
    parser.add_argument("--skip-exact", action="store_true", help="skip counting every line (minutes at 1 GB)")
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    sizes = [(s, int(float(s[:-1]) * units[s[-1].upper()])) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="ftplan-bench-") as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        # in a child process: this one must stay small, as a forked child starts with its parent's peak RSS
        subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_model.py"), str(directory)], check=True,
                       capture_output=True)
        print(f"ftplan dataset benchmark, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; tiny model's "
              "tokenizer; seq_len 256")
        for label, size in sizes:
            bench(directory, label, size, exact=not args.skip_exact)


if __name__ == "__main__":
    main()
