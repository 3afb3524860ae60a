"""Several processes for one plan: a generated accelerate config (DDP, FSDP or DeepSpeed ZeRO), the
launch command, written to the output directory so it can be rerun by hand, and the launch itself.

GPUs are launched with `accelerate launch`; CPU processes (tests, gloo) with torch's own launcher,
because accelerate launches multi-CPU jobs through MPI.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ftplan.api import Plan, PlannerError, ProgressCallback, ProgressEvent, RunRequest, RunResult

from .loop import mixed_precision

CONFIG = "accelerate_config.yaml"
COMMAND = "launch.sh"
RESULT = ".result.json"
EVENTS = ".events.jsonl"  # process 0's progress events, followed here and handed to ftplan


def accelerate_config(plan: Plan, *, processes: int, machines: int, machine_rank: int, main_ip: str,
                      main_port: int, cpu: bool) -> dict:
    """The accelerate config for the plan's sharding: DDP, FSDP (full or hybrid shard) or DeepSpeed ZeRO."""
    sharding = plan.hardware.sharding
    config = {"compute_environment": "LOCAL_MACHINE", "num_processes": processes, "num_machines": machines,
              "machine_rank": machine_rank, "main_process_ip": main_ip, "main_process_port": main_port,
              "mixed_precision": mixed_precision(plan), "use_cpu": cpu, "rdzv_backend": "static",
              "same_network": True, "distributed_type": "MULTI_CPU" if cpu else "MULTI_GPU"}
    if sharding == "fsdp" and not cpu:
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False, "fsdp_activation_checkpointing": False}
    elif sharding.startswith("zero") and not cpu:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"zero_stage": int(sharding[-1]), "offload_optimizer_device": "none",
                                      "offload_param_device": "none", "zero3_init_flag": sharding == "zero3",
                                      "gradient_accumulation_steps": "auto"}
    return config


def write_new(path: Path, text: str, *, append: bool = False) -> None:
    """Write `path` inside the output directory without ever following a link there: whatever holds the
    name is unlinked first (unless appending), and the file is created with O_EXCL | O_NOFOLLOW."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    if append:
        flags |= os.O_APPEND
    else:
        if path.is_symlink() or path.exists():
            path.unlink()
        flags |= os.O_EXCL
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config_path: Path, processes: int, cpu: bool, worker_args: list[str], port: int) -> list[str]:
    if cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(port), "-m", "ftplan.backends.hf.worker", *worker_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), "-m",
            "ftplan.backends.hf.worker", *worker_args]


def launch(plan: Plan, request: RunRequest, *, processes: int, cpu: bool, machines: int = 1, machine_rank: int = 0,
           main_ip: str = "127.0.0.1", progress: ProgressCallback) -> RunResult:
    """Start `processes` workers, follow metrics.jsonl for progress, and return process 0's result."""
    import yaml

    out = request.output_dir
    out.mkdir(parents=True, exist_ok=True)
    port = free_port() if machines == 1 else 29500
    config = accelerate_config(plan, processes=processes * machines, machines=machines, machine_rank=machine_rank,
                               main_ip=main_ip, main_port=port, cpu=cpu)
    write_new(out / CONFIG, yaml.safe_dump(config, sort_keys=False))
    request_file = out / ".request.json"
    write_new(request_file, request.model_dump_json())
    args = ["--plan", str(out / "plan.yaml"), "--request", str(request_file)]
    cmd = command(out / CONFIG, processes, cpu, args, port)
    write_new(out / COMMAND, "#!/bin/sh\n# rerun this plan's launch by hand (on every node, with its machine_rank)\n"
              + " ".join(shlex.quote(c) for c in cmd) + "\n")
    (out / RESULT).unlink(missing_ok=True)
    events = out / EVENTS
    events.unlink(missing_ok=True)
    proc, logs = _start(cmd)
    interrupted = _supervise(proc, events, progress)
    request_file.unlink(missing_ok=True)
    events.unlink(missing_ok=True)
    if not (out / RESULT).exists():
        if interrupted:  # stopped before the workers could report: ftplan treats it as Ctrl-C
            raise KeyboardInterrupt
        from .worker import ERROR_PREFIX

        said = [line.split(ERROR_PREFIX, 1)[1].strip() for line in logs if ERROR_PREFIX in line]
        detail = said[0] if said else " | ".join(list(logs)[-3:])
        raise PlannerError(f"the {processes} training processes failed (exit {proc.returncode}): {detail[:400]}")
    result = RunResult.model_validate_json((out / RESULT).read_text())
    (out / RESULT).unlink()
    result.artifacts += [CONFIG, COMMAND]
    return result


def _start(cmd: list[str]) -> tuple[subprocess.Popen, deque]:
    """The launcher in a session of its own - so a signal can reach every worker at once (killpg) and a
    terminal's Ctrl-C reaches only ftplan, which forwards it once - with SIGINT ignored by the launcher itself
    (the workers install their own handlers; torchrun would otherwise tear them down on a timer). Its output is
    drained by a thread, the last lines kept for the error message."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGHUP,SIGQUIT"}
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec by the launcher only
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    logs: deque = deque(maxlen=200)
    threading.Thread(target=lambda: logs.extend(line.rstrip() for line in proc.stdout), daemon=True).start()
    return proc, logs


def _supervise(proc: subprocess.Popen, events: Path, progress: ProgressCallback) -> bool:
    """Follow process 0's events until the launcher exits; on KeyboardInterrupt (Ctrl-C, or SIGTERM as ftplan
    delivers it) pass SIGINT to every process of the group and wait for them to save together; a second
    interrupt kills them. Returns whether it was interrupted; no process outlives it."""
    follower, interrupted = _Follower(events, progress), False
    try:
        while proc.poll() is None:
            follower.read()
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
        _signal_group(proc, signal.SIGINT)
        try:
            while proc.poll() is None:
                follower.read()
                time.sleep(0.2)
        except KeyboardInterrupt:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    finally:
        if proc.poll() is None:  # an unexpected error here: leave no orphans
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    follower.read()
    return interrupted


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the launcher leads its session: its group holds every worker
    except ProcessLookupError:
        pass


class _Follower:
    """Progress events appended by process 0, read from where the last read stopped (complete lines only)."""

    def __init__(self, path: Path, progress: ProgressCallback) -> None:
        self.path, self.progress, self.offset = path, progress, 0

    def read(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").split("\n"):
            if line.strip():
                self.progress(ProgressEvent.model_validate(json.loads(line)))
