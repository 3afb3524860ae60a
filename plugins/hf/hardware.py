"""Is the plan's hardware here? The hf backend trains where `ftplan run` is typed, so a plan made for other
hardware (several instances, more GPUs, another GPU type) is refused before anything loads, unless the user
says `--here`. GPUs are read without importing torch (nvidia-smi, else the driver's /proc entries)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ftplan.api import Plan, RunRequest

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
MEMORY_TOLERANCE = 0.15  # what nvidia-smi and EC2's figures for one GPU model differ by is well under this


@cache  # the machine does not change while ftplan runs; check, notices and run each ask
def gpus_here() -> list[tuple[str, int]]:
    """(name, memory in bytes; 0 when unknown) of each NVIDIA GPU this process may use, [] when none."""
    found: list[tuple[str, int]] = []
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            for line in out.splitlines():
                name, _, mib = line.rpartition(",")
                found.append((name.strip(), int(float(mib)) * 2**20))
        except (OSError, subprocess.SubprocessError, ValueError):
            found = []
    if not found and PROC_GPUS.is_dir():  # a driver without nvidia-smi (some containers)
        for info in sorted(PROC_GPUS.glob("*/information")):
            model = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.MULTILINE)
            if model:
                found.append((model.group(1).strip(), 0))
    return _visible(found)


def _visible(gpus: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """CUDA_VISIBLE_DEVICES, when it lists indices, limits what a run here can use."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    indices = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(i.isdigit() for i in indices):  # UUIDs or MIG names: trust the count
        return gpus[:len(indices)]
    return [gpus[int(i)] for i in indices if int(i) < len(gpus)]


def is_gpu(plan_gpu: str, plan_memory: int, name: str, memory: int) -> bool:
    """Whether a device ('NVIDIA A100-SXM4-80GB', 23028 MiB) is the plan's catalogued GPU ('A100-80GB')."""
    family = plan_gpu.split("-")[0].upper()
    if family not in re.split(r"[\s\-_/]+", name.upper()):
        return False
    return not (memory and plan_memory) or abs(memory - plan_memory) <= MEMORY_TOLERANCE * plan_memory


@dataclass
class Fit:
    """How the plan's hardware compares with this machine."""

    mismatches: list[str]  # what refuses the run unless --here
    warnings: list[str]    # said at the start, the run goes on


def compare(plan: Plan, request: RunRequest, gpus: list[tuple[str, int]], *, node_of: int | None = None) -> Fit:
    """The plan's hardware against this machine's GPUs. `node_of`: this is one node of a multi-node rendezvous
    of that many machines (SkyPilot's, or set by hand), so the instance count is accounted for."""
    hw = plan.hardware
    mismatches, warnings = [], []
    if request.device == "cpu":
        gpus = []
    where = f"{hw.instance_count} x {hw.instance_type} ({hw.gpus_per_instance} x {hw.gpu} each)"
    if hw.instance_count > 1 and node_of is None:
        mismatches.append(f"the plan is for {where} and this is one machine")
    if gpus and hw.gpus_per_instance > len(gpus):
        mismatches.append(f"the plan needs {hw.gpus_per_instance} GPUs per instance and this machine has {len(gpus)}")
    elif not gpus and hw.gpus_per_instance > 1:
        mismatches.append(f"the plan needs {hw.gpus_per_instance} GPUs per instance and this machine has none")
    elif not gpus:
        warnings.append(f"the plan is for {where}; this machine has no GPU, so it trains on the CPU (fine for a "
                        "tiny model; a real one needs the plan's GPU)")
    if gpus and not any(is_gpu(hw.gpu, plan.estimates.gpu_memory_bytes, name, memory) for name, memory in gpus):
        mismatches.append(f"the plan is for {hw.gpu} GPUs and this machine has {gpus[0][0]}")
    return Fit(mismatches=mismatches, warnings=warnings)
