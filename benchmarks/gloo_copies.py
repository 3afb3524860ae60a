"""What gloo's collectives hold beyond their tensors on the CPU: the resident-set rise of one bare
reduce_scatter_tensor (input 64 MiB of bf16) and one all_gather_into_tensor (output 64 MiB) over 2 and 4 processes,
glibc set as benchmarks/deepspeed_cpu.py sets it so freed memory leaves the resident set. These are the figures
behind the CPU-only terms of ftplan.estimate.sharding (benchmarks/FSDP.md, changes 4 and 8): gloo's reduce-scatter
copies its whole input while it runs, its all-gather its output.

Usage: python benchmarks/gloo_copies.py      (under a minute; prints one line per collective and process count)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deepspeed_cpu import GLIBC, _status  # noqa: E402 - benchmarks/ is not a package

MIB = 2**20
SIZE = 64 * MIB  # bytes of the collective's whole tensor, bf16


def _rank(rank: int, world: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    numel = SIZE // 2
    rises = {}
    for name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
        whole = torch.ones(numel, dtype=torch.bfloat16)
        shard = torch.zeros(numel // world, dtype=torch.bfloat16)
        dist.barrier()
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak from here
        if name == "reduce_scatter_tensor":
            dist.reduce_scatter_tensor(shard, whole)
        else:
            dist.all_gather_into_tensor(whole, shard)
        rises[name] = (_status("VmHWM") - before) / MIB
        del whole, shard
    results[rank] = rises
    dist.destroy_process_group()


def measure(world: int) -> dict[str, float]:
    """The largest process's resident-set rise per collective, MiB."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(world, port, results), nprocs=world, join=True)
    return {name: max(r[name] for r in results.values()) for name in results[0]}


def main() -> int:
    if any(os.environ.get(k) != v for k, v in GLIBC.items()):  # glibc reads these at start-up: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **GLIBC, "OMP_NUM_THREADS": "1"})
    for world in (2, 4):
        for name, rise in measure(world).items():
            print(f"{name}, {world} processes, {SIZE // MIB} MiB whole tensor: resident set +{rise:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
