"""Imported by every Python process started with benchmarks/site on PYTHONPATH (benchmarks/accuracy.py does
that for its measured processes). With FTPLAN_BENCH_CPU_BF16=1 it installs the blocked fp32 matmul and
attention kernels of benchmarks/cpu_bf16.py before anything runs, so both the `ftplan measure` process and the
RSS instrument's child get them; without the variable it does nothing."""

import os
import sys

if os.environ.get("FTPLAN_BENCH_CPU_BF16") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import cpu_bf16

    sys.path.pop(0)
    cpu_bf16.install()
