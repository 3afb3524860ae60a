"""A Slurm trainer backend: the accepted plan as one batch job, which runs ftplan's own hf backend on the
allocated node(s), on a file system the submitting machine shares with the cluster.

What the contract asks of a backend, and how this one answers:
- `check`: what stops it here and now (no `sbatch`, a plan for hardware it does not run), each with a fix;
- `dry_run`: the batch script it would submit, as data;
- `run`: submits, follows the job's progress, returns a RunResult; Ctrl-C (or SIGTERM, which ftplan
  delivers as KeyboardInterrupt) asks the job to save a checkpoint and stop;
- `checkpoint_step`: which step `--resume` would continue from;
- `owned_patterns`: what it writes into --output, so `--force` may replace it.
ftplan itself writes plan.yaml, metrics.jsonl and summary.json and checks the result.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import Field

from ftplan.api import (
    BackendOptions,
    Plan,
    PlannerError,
    Problem,
    ProgressCallback,
    ProgressEvent,
    RunRequest,
    RunResult,
    TrainerBackend,
)

JOB_DIR = "job"          # the inner run's --output, inside ours
SCRIPT = "job.sbatch"
LOG = "job.log"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class SlurmOptions(BackendOptions):
    """`ftplan run --backend slurm --option KEY=VALUE`."""

    partition: str = Field("gpu", description="Slurm partition to submit to")
    account: str | None = Field(None, description="Slurm account to charge, if the cluster needs one")
    sbatch: str = Field("sbatch", description="the sbatch command (a path, or a name on PATH)")
    scancel: str = Field("scancel", description="the scancel command, used to interrupt the job")
    python: str = Field(sys.executable, description="Python with ftplan[train] installed, as seen on the nodes")
    time_margin: float = Field(1.5, ge=1.0, description="the job's time limit: planned hours x this")
    poll_seconds: float = Field(1.0, gt=0, description="how often the job's progress is read")


class SlurmBackend(TrainerBackend):
    """Runs a plan as a Slurm batch job on the on-premise cluster."""

    name = "slurm"
    description = "a Slurm batch job on the on-premise cluster (ftplan's hf backend on the node)"
    methods = ("full", "lora", "qlora")
    platforms = ("onprem",)
    options_model = SlurmOptions
    owned_patterns = (SCRIPT, LOG, JOB_DIR)

    def check(self, plan: Plan, request: RunRequest, options: SlurmOptions) -> list[Problem]:
        problems = self.supports(plan)
        if not request.dry_run and shutil.which(options.sbatch) is None:
            problems.append(Problem(message=f"'{options.sbatch}' is not on this machine",
                                    fix="run from a Slurm login node, or pass --option sbatch=/path/to/sbatch"))
        return problems

    def checkpoint_step(self, request: RunRequest, options: SlurmOptions) -> int | None:
        steps = [int(m.group(1)) for p in (request.output_dir / JOB_DIR).glob("checkpoint-*")
                 if (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").exists()]
        return max(steps) if steps else None

    def script(self, plan: Plan, request: RunRequest, options: SlurmOptions) -> str:
        """The batch script: resources from the plan, then `ftplan run` with the hf backend on the node."""
        out = request.output_dir.resolve()
        hours = max(1.0, plan.estimates.hours * options.time_margin)
        inner = [options.python, "-m", "ftplan", "run", str(out / "plan.yaml"), "--backend", "hf", "--here",
                 "--data", str(request.data.resolve()), "--output", str(out / JOB_DIR), "--json",
                 "--save-every", str(request.save_every)]
        if request.max_steps:
            inner += ["--max-steps", str(request.max_steps)]
        if request.resume:
            inner.append("--resume")
        if request.model_path:
            inner += ["--model-path", request.model_path]
        lines = ["#!/bin/bash", f"#SBATCH --job-name=ftplan-{plan.model.name[:40]}",
                 f"#SBATCH --partition={options.partition}", f"#SBATCH --nodes={plan.hardware.instance_count}",
                 f"#SBATCH --gpus-per-node={plan.hardware.gpus_per_instance}",
                 f"#SBATCH --time={int(hours * 60)}", f"#SBATCH --output={out / LOG}"]
        if options.account:
            lines.append(f"#SBATCH --account={options.account}")
        return "\n".join(lines + ["", "exec " + " ".join(shlex.quote(a) for a in inner), ""])

    def dry_run(self, plan: Plan, request: RunRequest, options: SlurmOptions) -> dict:
        return {"sbatch": [options.sbatch, "--parsable", "--wait", SCRIPT],
                "script": self.script(plan, request, options)}

    def run(self, plan: Plan, request: RunRequest, options: SlurmOptions, progress: ProgressCallback) -> RunResult:
        out = request.output_dir
        (out / SCRIPT).write_text(self.script(plan, request, options))
        job = subprocess.Popen([options.sbatch, "--parsable", "--wait", str(out / SCRIPT)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        job_id = (job.stdout.readline() if job.stdout else "").strip().split(";")[0]
        seen, interrupted = 0, False
        try:
            while job.poll() is None:
                seen = _follow(out / JOB_DIR / "metrics.jsonl", seen, progress)
                time.sleep(options.poll_seconds)
        except KeyboardInterrupt:  # ask the job to checkpoint and stop, then wait for it
            interrupted = True
            subprocess.run([options.scancel, f"--signal={signal.SIGINT.name}", job_id], check=False)
            job.wait()
        _follow(out / JOB_DIR / "metrics.jsonl", seen, progress)
        summary = out / JOB_DIR / "summary.json"
        if not summary.exists():
            raise PlannerError(f"Slurm job {job_id} ended (exit {job.returncode}) without a result; see {out / LOG}")
        inner = json.loads(summary.read_text())["result"]
        artifacts = [SCRIPT, LOG] + [f"{JOB_DIR}/{name}" for name in inner["artifacts"]]
        return RunResult(**{**inner, "output_dir": out, "artifacts": [a for a in artifacts if (out / a).exists()],
                            "interrupted": inner["interrupted"] or interrupted,
                            "notes": [*inner["notes"], f"Slurm job {job_id} on partition {options.partition}"]})


def _follow(metrics: Path, seen: int, progress: ProgressCallback) -> int:
    """Hand the job's new progress lines to ftplan (a line being written is read next time)."""
    if not metrics.exists():
        return seen
    for line in metrics.read_text(encoding="utf-8").splitlines()[seen:]:
        try:
            progress(ProgressEvent.model_validate_json(line))
        except ValueError:
            break
        seen += 1
    return seen
