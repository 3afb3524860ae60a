"""Instruments for the memory of one training step on the CPU, independent of each other.

- the tracker (memtrack.LiveBytes): live tensor storages seen at the Python dispatch level. It gives the
  phase marks cheaply, but not what an op allocates and frees inside itself (custom ops such as
  bitsandbytes' CPU optimizer, oneDNN scratch buffers).
- the allocator: torch's profiler with profile_memory, which reports every block the c10 CPU allocator hands
  out or takes back - intra-op buffers included - run over its own measured step.
- the resident set: the process's own peak RSS over one step (VmHWM after resetting it through
  /proc/self/clear_refs), in a child process whose glibc serves every allocation of 64 KiB or more with
  mmap and never keeps freed memory, so RSS follows what is allocated. Linux only.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

# glibc: mmap everything from 64 KiB, return freed memory at once - set before the interpreter starts
GLIBC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
CLEAR_REFS = Path("/proc/self/clear_refs")


MARK = "ftplan::measured_step"


def allocator_peak(session) -> tuple[int, str, dict[str, int]]:
    """The step's peak by the c10 CPU allocator: every block handed out or taken back, intra-op buffers
    included, from the profiler's allocation events. Returns (peak bytes, op path of the allocation that
    reached it, bytes live at the peak by op).

    The profiler does not report frees of blocks allocated before it started, so it watches two steps and the
    peak is taken over the second: by then everything the first step freed (a custom loop's previous outputs)
    was allocated under its eyes."""
    import torch
    from torch._C._profiler import _EventType

    from ftplan.measure.session import nbytes

    kept = nbytes(t for t in (session.kept.get("outputs") or {}).values() if isinstance(t, torch.Tensor))
    resident = nbytes(session.resident_tensors())
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        session.step()
        with torch.profiler.record_function(MARK):
            session.step()
    events, start = _allocations(prof.profiler.kineto_results.experimental_event_tree(), _EventType)
    live: dict[int, tuple[int, tuple[str, ...]]] = {}
    current = resident - kept  # the previous outputs go during the first step, unreported
    peak, peak_i = 0, -1
    for i, (when, ptr, size, path) in enumerate(events):
        if size > 0:
            live[ptr] = (size, path)
            current += size
        elif ptr in live:
            current -= live.pop(ptr)[0]
        if when >= start and current > peak:
            peak, peak_i = current, i
    return peak, " > ".join(events[peak_i][3][-3:]) if peak_i >= 0 else "", _live_at(events, peak_i)


def _allocations(tree, event_type) -> tuple[list, int]:
    """CPU allocation events (time, ptr, size, op path) in time order, and when the measured step began."""
    events: list[tuple[int, int, int, tuple[str, ...]]] = []
    marks: list[int] = []

    def walk(node, path: tuple[str, ...]) -> None:
        if node.tag == event_type.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.ptr, fields.alloc_size, path))
            return
        if node.name == MARK:
            marks.append(node.start_time_ns)
        sub = path + ((node.name,) if node.tag == event_type.TorchOp else ())
        for child in node.children:
            walk(child, sub)

    for root in tree:
        walk(root, ())
    events.sort(key=lambda e: e[0])
    return events, min(marks) if marks else 0


def _live_at(events: list, index: int) -> dict[str, int]:
    """Bytes allocated during the two steps and live at event `index`, by the last ops of their path."""
    live: dict[int, tuple[int, tuple[str, ...]]] = {}
    for _, ptr, size, path in events[:index + 1]:
        if size > 0:
            live[ptr] = (size, path)
        else:
            live.pop(ptr, None)
    by_op: dict[str, int] = {}
    for size, path in live.values():
        key = " > ".join(path[-2:]) if path else "(outside ops)"
        by_op[key] = by_op.get(key, 0) + size
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side writes start/stop lines to file descriptor 2; keep them off the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def rss_supported() -> bool:
    return sys.platform.startswith("linux") and CLEAR_REFS.exists()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_extra(step) -> int:
    """Peak resident bytes during `step()` beyond the resident bytes before it (run in a child started by
    `rss_in_child`, so glibc's settings make RSS follow allocations)."""
    gc.collect()
    before = _status_bytes("VmRSS")
    CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    step()
    return _status_bytes("VmHWM") - before


def rss_in_child(request: dict, timeout: float = 7200) -> dict:
    """Run `python -m ftplan.measure.child` with glibc set for RSS measuring; returns what it reports."""
    env = {**os.environ, **GLIBC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "ftplan.measure.child"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        from ftplan.errors import PlannerError

        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PlannerError(f"the RSS measurement's child process failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
