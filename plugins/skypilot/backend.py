"""The bundled SkyPilot trainer backend: the plan as a SkyPilot task on its EC2 instances, ftplan's hf backend on
every node, outputs through a bucket.

On-demand plans run on a cluster with autostop, torn down when the run ends (`--option keep=true` keeps it);
spot plans run as a managed job, which SkyPilot recovers after a preemption and which resumes from the
checkpoints the nodes keep in the bucket. `ftplan run` follows the job's log (its `ftplan-metric` lines are the
progress display and metrics.jsonl), then downloads the adapter or model, the job's summary and metrics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ftplan.api import (
    BackendOptions,
    Plan,
    PlannerError,
    Problem,
    ProgressCallback,
    RunRequest,
    RunResult,
    TrainerBackend,
    aws_error,
    pricing_rules,
)
from ftplan.api import plan_to_yaml as to_yaml

from . import cloud, storage, task

RECORD = "skypilot.json"   # the launched job: name, kind, id, bucket prefix; read by --resume
TASK_YAML = "task.yaml"    # the exact task launched, for the record
STAGED = "<staged at launch: src/ftplan, pyproject.toml, plan.yaml>"  # the workdir, a temporary folder


class SkyPilotOptions(BackendOptions):
    """`ftplan run --backend skypilot --option KEY=VALUE`."""

    bucket: str | None = Field(None, description="S3 bucket (NAME or s3://NAME/PREFIX) for checkpoints and outputs "
                                                 "[default: ftplan-<region>-<account>, created when missing]")
    keep: bool = Field(False, description="keep the cluster after the run (it still stops after autostop_minutes "
                                          "idle); on-demand plans")
    autostop_minutes: int = Field(30, gt=0, description="a cluster idle this long is torn down (stopped with keep)")
    disk_gb: int = Field(256, gt=0, description="each node's disk")
    install: Literal["auto", "source", "release"] = Field(
        "auto", description="how the nodes get ftplan: this ftplan's source, uploaded, or the same release from "
                            "PyPI [auto: release when installed from an index]")
    on_interrupt: Literal["ask", "cancel", "detach"] = Field(
        "ask", description="Ctrl-C or SIGTERM while following: ask (on a terminal; cancel otherwise), cancel the "
                           "job, or detach and leave it running")


def _install(options: SkyPilotOptions) -> str:
    if options.install != "auto":
        return options.install
    return "release" if task.installed_from_index() else "source"


class SkyPilotBackend(TrainerBackend):
    """Launches the plan's instances on EC2 through SkyPilot; on them, ftplan's own hf backend trains."""

    name = "skypilot"
    description = "the plan's EC2 instances through SkyPilot (a cluster, or a managed job for spot; hf on each node)"
    methods = ("full", "lora", "qlora")
    platforms = ("ec2",)
    options_model = SkyPilotOptions
    owned_patterns = (RECORD, TASK_YAML, "adapter", "model", "job-summary.json", "job-metrics.jsonl")

    def check(self, plan: Plan, request: RunRequest, options: SkyPilotOptions) -> list[Problem]:
        problems = self.supports(plan)
        if importlib.util.find_spec("sky") is None or importlib.util.find_spec("boto3") is None:
            return problems + [Problem(message="SkyPilot is not installed",
                                       fix="pip install 'ftplan[skypilot]' (SkyPilot with its AWS support)")]
        if problems or request.dry_run:
            return problems
        try:
            clients = cloud.aws_clients(plan.hardware.region)
        except PlannerError as exc:
            return [Problem(message=str(exc).split(";")[0], fix="aws configure (or set AWS_PROFILE), then sky "
                                                               "check aws")]
        found = cloud.aws_enabled()
        if found:
            problems.append(found)
        hw = plan.hardware
        quota = cloud.quota_problem(clients["service-quotas"], hw.instance_type, hw.instance_count,
                                    hw.market == "spot")
        return problems + ([quota] if quota else [])

    def checkpoint_step(self, request: RunRequest, options: SkyPilotOptions) -> int | None:
        record = self._record(request.output_dir)
        if record is None:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            steps = storage.checkpoint_steps(cloud.aws_clients(record["region"])["s3"], record["bucket_uri"])
        except (BotoCoreError, ClientError) as exc:
            raise aws_error(exc, "S3", "nothing was started") from None
        return steps[-1] if steps else None

    def _record(self, output_dir: Path) -> dict | None:
        path = output_dir / RECORD
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise PlannerError(f"{path} is not valid JSON; remove it and run without --resume") from None

    def describe(self, plan: Plan, request: RunRequest, options: SkyPilotOptions, *, name: str, workdir: str,
                 bucket_uri: str) -> dict:
        """The task YAML and how it is launched."""
        config = task.task_config(plan, request, name=name, workdir=workdir, bucket_uri=bucket_uri,
                                  install=_install(options), disk_gb=options.disk_gb)
        managed = plan.hardware.market == "spot"
        launch = {"call": "sky.jobs.launch", "name": name} if managed else {
            "call": "sky.launch", "cluster_name": name, "idle_minutes_to_autostop": options.autostop_minutes,
            "down": not options.keep, "then": "sky.down after the run" if not options.keep else "kept"}
        return {"task": config, "launch": launch, "bucket": bucket_uri}

    def dry_run(self, plan: Plan, request: RunRequest, options: SkyPilotOptions) -> dict:
        name = task.run_name(plan)
        bucket_uri = storage.location(options.bucket, plan.hardware.region, name, None)
        described = self.describe(plan, request, options, name=name, workdir=STAGED, bucket_uri=bucket_uri)
        described["secrets"] = ["HF_TOKEN (from this environment, when set)"]
        return described

    def run(self, plan: Plan, request: RunRequest, options: SkyPilotOptions, progress: ProgressCallback) -> RunResult:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._run(plan, request, options, progress)
        except (BotoCoreError, ClientError) as exc:
            raise aws_error(exc, "S3", "see the notes for what was started") from None

    def _prepare(self, plan: Plan, request: RunRequest, options: SkyPilotOptions, clients: dict) -> dict:
        """The run's record: its name and bucket prefix (the previous run's on --resume), written before launch."""
        previous = self._record(request.output_dir) if request.resume else None
        if previous:
            return previous
        name = task.run_name(plan)
        account = None if options.bucket else clients["sts"].get_caller_identity()["Account"]
        uri = storage.location(options.bucket, plan.hardware.region, name, account)
        if not options.bucket:
            storage.ensure_bucket(clients["s3"], storage.split(uri)[0], plan.hardware.region)
        return {"name": name, "managed": plan.hardware.market == "spot", "bucket_uri": uri,
                "region": plan.hardware.region, "job_id": None}

    def _run(self, plan: Plan, request: RunRequest, options: SkyPilotOptions, progress: ProgressCallback) -> RunResult:
        out = request.output_dir
        clients = cloud.aws_clients(plan.hardware.region)
        record = self._prepare(plan, request, options, clients)
        name, managed = record["name"], record["managed"]
        follower = Follower(progress, request.resume_step if request.resume else None)
        staged = Path(tempfile.mkdtemp(prefix="ftplan-skypilot-"))
        started = time.monotonic()
        launched, how, code = False, "failed", None
        try:
            task.stage(staged, to_yaml(plan))
            described = self.describe(plan, request, options, name=name, workdir=str(staged),
                                      bucket_uri=record["bucket_uri"])
            import yaml  # here, not at import: `ftplan plugins` loads this module and has no use for YAML

            (out / TASK_YAML).write_text(yaml.safe_dump({**described["task"], "workdir": STAGED}, sort_keys=False))
            secrets = {"HF_TOKEN": os.environ["HF_TOKEN"]} if os.environ.get("HF_TOKEN") else {}
            sky_task = cloud.build_task(described["task"], secrets)
            (out / RECORD).write_text(json.dumps(record, indent=1))
            launched = True
            record["job_id"] = cloud.launch(sky_task, name=name, managed=managed,
                                            autostop_minutes=options.autostop_minutes, keep=options.keep,
                                            on_line=follower.line)
            (out / RECORD).write_text(json.dumps(record, indent=1))
            shutil.rmtree(staged, ignore_errors=True)  # SkyPilot has taken the workdir by now
            code, how = self._follow(record, follower, options)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
            if launched and not managed and not options.keep and how != "detached":
                _teardown(name, follower)
        wall = time.monotonic() - started
        return self._result(plan, request, record, clients, follower, code, how, wall)

    def _follow(self, record: dict, follower: Follower, options: SkyPilotOptions) -> tuple[int | None, str]:
        """Follow the job's log to its end; on Ctrl-C (or SIGTERM) cancel it, detach, or follow on."""
        name, job_id, managed = record["name"], record["job_id"], record["managed"]
        while True:
            try:
                return cloud.follow(name, job_id, managed=managed, on_line=follower.line), "ended"
            except KeyboardInterrupt:
                choice = _interrupt_choice(options.on_interrupt, name, managed)
                if choice == "cancel":
                    cloud.cancel(name, job_id, managed=managed)
                    return None, "cancelled"
                if choice == "detach":
                    return None, "detached"

    def _result(self, plan: Plan, request: RunRequest, record: dict, clients: dict, follower: Follower,
                code: int | None, how: str, wall: float) -> RunResult:
        out, name = request.output_dir, record["name"]
        where = f"{'managed job' if record['managed'] else 'cluster'} {name} (job {record['job_id']})"
        notes = [f"SkyPilot {where}; bucket {record['bucket_uri']}", *follower.notes]
        artifacts = [RECORD, TASK_YAML]
        if how == "detached":
            notes.append(f"detached: the job keeps running; follow it with {_logs_command(record)}; its outputs land "
                         f"in {record['bucket_uri']}")
        else:
            artifacts += storage.download(clients["s3"], record["bucket_uri"], out)
        inner = _job_result(out)
        if how == "ended" and (inner is None or code not in (0, None)):
            raise PlannerError(f"the SkyPilot job {name} ended without a result (exit {code}); see its log with "
                               f"{_logs_command(record)}" + (f"; last lines: {follower.tail()}" if follower.tail()
                                                             else ""))
        billed = billed_usd(plan, wall)
        notes.append(billing_note(plan, wall, billed, record["managed"]))
        base = inner or _from_events(follower.events)
        return RunResult(**{**base, "output_dir": out, "artifacts": sorted(set(artifacts)), "billed_usd": billed,
                            "wall_clock_seconds": wall, "interrupted": how != "ended" or base.get("interrupted", False),
                            "resumed_from_step": request.resume_step if request.resume else None,
                            "notes": notes + list(base.get("notes", []))})


class Follower:
    """The job's log lines: `ftplan-metric` events go to the progress callback once per step (a managed job
    restarted after a preemption repeats the steps after its checkpoint; resume is exact, so they are the same),
    and the last other lines are kept for an error message."""

    def __init__(self, progress: ProgressCallback, resume_step: int | None) -> None:
        self.progress, self.last_step = progress, resume_step or 0
        self.events: list = []
        self.lines: list[str] = []
        self.notes: list[str] = []

    def line(self, text: str) -> None:
        event = cloud.metric_event(text)
        if event is None:
            if text.strip():
                self.lines = (self.lines + [text.strip()])[-5:]
            return
        if event.step > self.last_step:
            self.last_step = event.step
            self.events.append(event)
            self.progress(event)

    def tail(self) -> str:
        return " | ".join(self.lines[-3:])[:400]


def _from_events(events: list) -> dict:
    """What the progress events say of a job that left no summary (cancelled, detached)."""
    first, last = (events[0], events[-1]) if events else (None, None)
    return {"steps": last.step if last else 0, "total_steps": last.total_steps if last else 0,
            "first_loss": first.loss if first else None, "final_loss": last.loss if last else None,
            "tokens": last.tokens if last else 0, "seconds": last.elapsed_seconds if last else 0.0,
            "tokens_per_second": last.tokens_per_second if last else 0.0,
            "peak_memory_bytes": last.peak_memory_bytes if last else None, "device": "cuda", "notes": []}


def _job_result(out: Path) -> dict | None:
    """The result the job's own `ftplan run` wrote (node 0's summary), downloaded as job-summary.json."""
    path = out / "job-summary.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text(encoding="utf-8"))["result"]
    return {k: v for k, v in result.items() if k not in ("output_dir", "artifacts", "billed_usd",
                                                         "wall_clock_seconds", "resumed_from_step")}


def billed_usd(plan: Plan, wall_seconds: float) -> float:
    """The plan's hourly price x instances x the measured wall-clock (launch to end: provisioning, setup and
    training), with EC2's per-instance minimum; what AWS bills for the instances, at the plan's price."""
    seconds = max(wall_seconds, pricing_rules().minimum_seconds(plan.hardware.platform))
    return seconds / 3600 * plan.estimates.price.usd_per_hour * plan.hardware.instance_count


def billing_note(plan: Plan, wall: float, billed: float, managed: bool) -> str:
    price = plan.estimates.price
    note = (f"billed ~${billed:,.2f} = ${price.usd_per_hour:.4g}/h ({price.market}, {price.date}) x "
            f"{plan.hardware.instance_count} instance(s) x {wall / 3600:.2f} h wall-clock from launch to the end "
            f"(provisioning and setup included); the plan: {plan.estimates.hours:.2f} h, "
            f"${plan.estimates.cost_usd:,.2f}")
    if managed:
        note += "; not included: SkyPilot's jobs controller VM and the spot price actually charged"
    return note


def _logs_command(record: dict) -> str:
    return f"sky jobs logs {record['job_id']}" if record["managed"] else f"sky logs {record['name']} {record['job_id']}"


def _interrupt_choice(setting: str, name: str, managed: bool) -> str:
    """cancel, detach or follow: as --option on_interrupt says, asking on a terminal."""
    if setting != "ask":
        return setting
    if not sys.stdin or not sys.stdin.isatty():
        return "cancel"  # nobody to ask: do not leave GPUs billing unattended
    what = "managed job" if managed else "job on cluster"
    sys.stderr.write(f"\nftplan: interrupted. Cancel the {what} {name}? [c]ancel, [d]etach (it keeps running), "
                     "[f]ollow on: ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip().lower()
    except KeyboardInterrupt:
        return "cancel"
    return {"c": "cancel", "d": "detach"}.get(answer[:1], "follow")


def _teardown(name: str, follower: Follower) -> None:
    """Tear the cluster down. A failure does not lose the run (its outputs are in the bucket) but is said in the
    summary with the command that finishes the job, since the cluster would keep billing until autostop."""
    try:
        cloud.down(name)
    except Exception as exc:  # noqa: BLE001 - whatever SkyPilot raised, the user must hear of it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        follower.notes.append(f"could not tear down cluster {name} ({first[:200]}); it stops itself after its "
                              f"autostop, or run: sky down {name}")
