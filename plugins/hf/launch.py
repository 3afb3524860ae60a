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

from .loop import accumulation, mixed_precision

CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed_config.json"
COMMAND = "launch.sh"
RESULT = ".result.json"
EVENTS = ".events.jsonl"  # process 0's progress events, followed here and handed to ftplan
ERROR_PREFIX = "ftplan-worker: error:"  # the one line a failing worker prints for the launching process


def accelerate_config(plan: Plan, *, processes: int, machines: int, machine_rank: int, main_ip: str,
                      main_port: int, cpu: bool, deepspeed_file: Path | None = None) -> dict:
    """The accelerate config for the plan's sharding: DDP, FSDP (full shard; the backend refuses fsdp-hybrid) or
    DeepSpeed ZeRO (whose settings are in `deepspeed_file`, written from deepspeed_config())."""
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
    elif sharding.startswith("zero"):  # on the CPU too: DeepSpeed has a CPU accelerator (command() starts it there)
        # accelerate refuses a config file that sets mixed_precision beside a DeepSpeed config file (its
        # launcher passes the key on, and DeepSpeedPlugin raises): the precision is in deepspeed_config()
        del config["mixed_precision"]
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"deepspeed_config_file": str(deepspeed_file),
                                      "zero3_init_flag": sharding == "zero3"}
    return config


def deepspeed_config(plan: Plan, processes: int) -> dict:
    """The DeepSpeed config for a ZeRO plan over `processes` processes in all. The run's figures are written out:
    the loop prepares no dataloader, so accelerate could not fill "auto" micro-batch sizes, and DeepSpeed
    counts the accumulation and clips itself (the loop does neither under DeepSpeed). The buckets follow the
    Trainer's documented recipe, "auto" (filled by accelerate from the model's hidden size: reduce hidden^2,
    ZeRO-3 prefetch 0.9 hidden^2, persistence 10 hidden) - what ftplan's estimate models. Without them
    DeepSpeed's defaults apply: a reduce bucket of 5e8 elements, about 1 GB more per GPU. The engine's dtype
    is the plan's half precision, with or without -mixed (DeepSpeed casts the module; accelerate has no
    autocast under it), as ftplan.estimate.deepspeed assumes."""
    t, hw = plan.training, plan.hardware
    accum = accumulation(plan, processes)  # the backend has refused process counts that do not split the batch
    precision = t.setup.precision
    return {"train_micro_batch_size_per_gpu": t.setup.batch_size, "gradient_accumulation_steps": accum,
            "train_batch_size": t.setup.batch_size * accum * processes, "gradient_clipping": t.max_grad_norm,
            "bf16": {"enabled": precision.startswith("bf16")}, "fp16": {"enabled": precision.startswith("fp16")},
            "zero_optimization": {"stage": int(hw.sharding[-1]), "offload_optimizer": {"device": "none"},
                                  "offload_param": {"device": "none"}, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"}}


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


def command(config_path: Path, processes: int, cpu: bool, worker_args: list[str], port: int, *, machines: int = 1,
            machine_rank: int = 0, main_ip: str = "127.0.0.1", deepspeed_file: Path | None = None,
            zero3: bool = False) -> list[str]:
    """The launch command on this machine: accelerate's on GPUs (the config says machines, rank and address),
    torch's launcher with a static rendezvous on the CPU - for a ZeRO plan with the variables accelerate's own
    launcher sets for DeepSpeed (the config file, ZeRO-3's sharded model initialisation)."""
    if cpu:
        nodes = ["--nnodes", str(machines), "--node_rank", str(machine_rank), "--master_addr", main_ip] \
            if machines > 1 else []
        # no GPU visible: accelerate and DeepSpeed would otherwise take a machine's GPUs for a --device cpu run
        deepspeed = ["env", "CUDA_VISIBLE_DEVICES=", "ACCELERATE_USE_DEEPSPEED=true",
                     f"ACCELERATE_DEEPSPEED_CONFIG_FILE={deepspeed_file}",
                     f"ACCELERATE_DEEPSPEED_ZERO3_INIT={str(zero3).lower()}"] if deepspeed_file else []
        return [*deepspeed, sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc_per_node", str(processes),
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
    written = [CONFIG, COMMAND]
    zero = plan.hardware.sharding.startswith("zero")
    if zero:
        write_new(out / DEEPSPEED_CONFIG, json.dumps(deepspeed_config(plan, processes * machines), indent=1) + "\n")
        written.append(DEEPSPEED_CONFIG)
    config = accelerate_config(plan, processes=processes * machines, machines=machines, machine_rank=machine_rank,
                               main_ip=main_ip, main_port=port, cpu=cpu,
                               deepspeed_file=(out / DEEPSPEED_CONFIG).resolve())
    write_new(out / CONFIG, yaml.safe_dump(config, sort_keys=False))
    request_file = out / ".request.json"
    write_new(request_file, request.model_dump_json())
    args = ["--plan", str(out / "plan.yaml"), "--request", str(request_file)]
    cmd = command(out / CONFIG, processes, cpu, args, port, machines=machines, machine_rank=machine_rank,
                  main_ip=main_ip, deepspeed_file=(out / DEEPSPEED_CONFIG).resolve() if zero else None,
                  zero3=plan.hardware.sharding == "zero3")
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
        said = [line.split(ERROR_PREFIX, 1)[1].strip() for line in logs if ERROR_PREFIX in line]
        detail = said[0] if said else " | ".join(list(logs)[-3:])
        raise PlannerError(f"the {processes} training process(es) here failed (exit {proc.returncode}): {detail[:400]}")
    result = RunResult.model_validate_json((out / RESULT).read_text())
    (out / RESULT).unlink()
    result.artifacts += written
    return result


SHUTDOWN_TIMEOUT_S = 900  # how long torchrun lets interrupted workers save before it kills them (its default: 30)


def _start(cmd: list[str]) -> tuple[subprocess.Popen, deque]:
    """The launcher, in a session of its own so a terminal's Ctrl-C reaches only ftplan, which forwards it once.
    torchrun starts each worker in a session of its own too, and forwards SIGINT to every one of them; it is
    given time for them to save. Its output is drained by a thread, the last lines kept for error messages."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), "PET_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    logs: deque = deque(maxlen=200)
    threading.Thread(target=lambda: logs.extend(line.rstrip() for line in proc.stdout), daemon=True).start()
    return proc, logs


def _supervise(proc: subprocess.Popen, events: Path, progress: ProgressCallback) -> bool:
    """Follow process 0's events until the launcher exits. On KeyboardInterrupt (Ctrl-C, or SIGTERM as ftplan
    delivers it) send SIGINT to the launcher, which passes it to every worker, and wait while they stop after
    their step and save one checkpoint together; a second interrupt kills the launcher and every process under
    it. Returns whether it was interrupted; no process outlives it."""
    follower, tree, interrupted = _Follower(events, progress), _Tree(proc), False
    try:
        while tree.alive():
            follower.read()
            time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
        proc.send_signal(signal.SIGINT)
        try:
            while tree.alive():
                follower.read()
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    finally:
        tree.kill()  # after a second interrupt, an unexpected error, or a launcher that died before its workers
    follower.read()
    return interrupted


class _Tree:
    """The launcher and every process under it. torchrun's workers lead sessions of their own, so no process-group
    signal reaches them, and a launcher that dies leaves them to init: they are found through /proc while the
    launcher lives (unreaped, so its PID cannot be reused), and remembered with their start times so that a PID
    the system has since given to another process is never killed."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.known, self.scanned = proc, {}, 0.0

    def alive(self) -> bool:
        """Whether the launcher still runs; it is not reaped here (WNOWAIT), only in kill()."""
        if self.proc.returncode is not None:
            return False
        try:
            exited = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            exited = True
        if not exited and time.monotonic() - self.scanned > 1.0:  # workers start once and live long: 1 s is enough
            self.known.update(_descendants(self.proc.pid))
            self.scanned = time.monotonic()
        return not exited

    def kill(self) -> None:
        """SIGKILL whatever is left of the tree, then reap the launcher."""
        if self.proc.returncode is None:
            self.known.update(_descendants(self.proc.pid))  # still unreaped: its PID is still its own
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        for pid, started in self.known.items():
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot; /proc/PID/stat field 22), or None when there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, int]:
    """Every process under `pid` with its start time (Linux /proc; empty where there is none)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
        except (OSError, ValueError, IndexError):
            continue
    found, stack = {}, [pid]
    while stack:
        for child, started in children.get(stack.pop(), []):
            found[child] = started
            stack.append(child)
    return found


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
