"""Several processes for one plan: a generated accelerate config (DDP, FSDP or DeepSpeed ZeRO), the
launch command, written to the output directory so it can be rerun by hand, and the launch itself.

GPUs are launched with `accelerate launch`; CPU processes (tests, gloo) with torch's own launcher,
because accelerate launches multi-CPU jobs through MPI.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config_path: Path, processes: int, cpu: bool, worker_args: list[str], port: int, *, machines: int = 1,
            machine_rank: int = 0, main_ip: str = "127.0.0.1") -> list[str]:
    """The launch command on this machine: accelerate's on GPUs (the config says machines, rank and address),
    torch's launcher with a static rendezvous on the CPU."""
    if cpu:
        nodes = ["--nnodes", str(machines), "--node_rank", str(machine_rank), "--master_addr", main_ip] \
            if machines > 1 else []
        return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(processes),
                "--master_port", str(port), "-m", "ftplan.backends.hf.worker", *worker_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), "-m",
            "ftplan.backends.hf.worker", *worker_args]


def launch(plan: Plan, request: RunRequest, *, processes: int, cpu: bool, machines: int = 1, machine_rank: int = 0,
           main_ip: str = "127.0.0.1", main_port: int = 29500, progress: ProgressCallback) -> RunResult:
    """Start `processes` workers here (one machine of `machines`), follow process 0's progress, and return this
    machine's first process's result (process 0's on machine 0)."""
    import yaml

    out = request.output_dir
    out.mkdir(parents=True, exist_ok=True)
    port = free_port() if machines == 1 else main_port
    config = accelerate_config(plan, processes=processes * machines, machines=machines, machine_rank=machine_rank,
                               main_ip=main_ip, main_port=port, cpu=cpu)
    (out / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    request_file = out / ".request.json"
    request_file.write_text(request.model_dump_json())
    args = ["--plan", str(out / "plan.yaml"), "--request", str(request_file)]
    cmd = command(out / CONFIG, processes, cpu, args, port, machines=machines, machine_rank=machine_rank,
                  main_ip=main_ip)
    (out / COMMAND).write_text("#!/bin/sh\n# rerun this plan's launch by hand (on every node, with its machine_rank)\n"
                               + " ".join(shlex.quote(c) for c in cmd) + "\n")
    (out / RESULT).unlink(missing_ok=True)
    events = out / EVENTS
    events.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    try:
        while proc.poll() is None:
            seen = _follow(events, seen, progress)
            time.sleep(0.2)
    except KeyboardInterrupt:  # pass Ctrl-C on: the workers save a checkpoint together
        proc.send_signal(2)
        proc.wait()
    _follow(events, seen, progress)
    logs = proc.stdout.read() if proc.stdout else ""
    request_file.unlink(missing_ok=True)
    events.unlink(missing_ok=True)
    if not (out / RESULT).exists():
        tail = " | ".join(line for line in logs.strip().splitlines()[-3:])
        raise PlannerError(f"the {processes} training process(es) here failed (exit {proc.returncode}): {tail[:400]}")
    result = RunResult.model_validate_json((out / RESULT).read_text())
    (out / RESULT).unlink()
    result.artifacts += [CONFIG, COMMAND]
    return result


def _follow(events: Path, seen: int, progress: ProgressCallback) -> int:
    if not events.exists():
        return seen
    lines = events.read_text(encoding="utf-8").splitlines()
    for line in lines[seen:]:
        try:
            progress(ProgressEvent.model_validate(json.loads(line)))
        except ValueError:
            return seen  # a line being written; read it next time
        seen += 1
    return seen
