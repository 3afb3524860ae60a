"""Every call into SkyPilot's SDK and AWS, in one place (tests fake SkyPilot's functions, and AWS at botocore).

`import sky` costs seconds and writes under ~/.sky, so it happens here, inside the calls, never when ftplan starts.
Every SDK call goes through a SkyPilot API server; the first one starts a local server when none is configured.
"""

from __future__ import annotations

import copy
import io
import re
from typing import Any, Callable

from ftplan.api import PlannerError, Problem, ProgressEvent, ec2_quotas, get_instance

METRIC = "ftplan-metric "


class LogLines(io.TextIOBase):
    """A text stream for SkyPilot's `output_stream=`: it may be written partial lines, so whole lines are handed
    on one at a time."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        super().__init__()
        self._buffer, self._on_line = "", on_line

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._on_line(line)
        return len(text)

    def flush(self) -> None:
        pass


def metric_event(line: str) -> ProgressEvent | None:
    """The progress event in an `ftplan-metric {json}` log line (SkyPilot prefixes a node's lines with its
    name and rank), else None."""
    at = line.find(METRIC)
    if at < 0:
        return None
    try:
        return ProgressEvent.model_validate_json(line[at + len(METRIC):].strip())
    except ValueError:
        return None


def build_task(config: dict, secrets: dict[str, str]):
    """The sky.Task for a task YAML (validated against SkyPilot's catalog), with secrets that never appear in
    the YAML ftplan prints or writes."""
    import sky

    task = sky.Task.from_yaml_config(copy.deepcopy(config))  # it empties the dict it is given
    if secrets:
        task.update_secrets(secrets)
    task.validate()
    return task


def launch(task, *, name: str, managed: bool, autostop_minutes: int, keep: bool, on_line: Callable[[str], None]) -> int:
    """Start the task: a managed job (spot: SkyPilot recovers it after a preemption) or a cluster with autostop
    (torn down when idle unless `keep`). Returns the job id; streams the launch log to `on_line`."""
    import sky

    stream = LogLines(on_line)
    request = sky.jobs.launch(task, name=name) if managed else \
        sky.launch(task, cluster_name=name, idle_minutes_to_autostop=autostop_minutes, down=not keep)
    try:
        started = sky.stream_and_get(request, output_stream=stream)
    except KeyboardInterrupt:  # the launch runs on in SkyPilot's API server unless it is cancelled there
        sky.get(sky.api_cancel(request, silent=True))
        raise
    if managed:
        job_ids = started[0] if started else None
        if not job_ids:
            raise PlannerError(f"SkyPilot did not start the managed job {name}")
        return int(job_ids[0])
    job_id = started[0] if started else None
    if job_id is None:
        raise PlannerError(f"SkyPilot started cluster {name} but no job on it")
    return int(job_id)


def follow(name: str, job_id: int, *, managed: bool, on_line: Callable[[str], None]) -> int | None:
    """Stream the job's log until it ends; its exit code (SkyPilot's JobExitCode: 0 succeeded, 100 failed,
    103 cancelled), or None when SkyPilot does not say."""
    import sky

    stream = LogLines(on_line)
    if managed:
        code = sky.jobs.tail_logs(job_id=job_id, follow=True, output_stream=stream)
    else:
        code = sky.tail_logs(name, job_id, follow=True, output_stream=stream)
    return None if code is None else int(code)


def cancel(name: str, job_id: int, *, managed: bool) -> None:
    import sky

    if managed:
        sky.get(sky.jobs.cancel(job_ids=[job_id]))
    else:
        sky.get(sky.cancel(name, job_ids=[job_id]))


def down(name: str) -> None:
    """Tear the cluster down (sky.launch(down=True) alone does not when provisioning or setup fails)."""
    import sky

    sky.get(sky.down(name))


def aws_clients(region: str) -> dict[str, Any]:
    """boto3 clients for the plan's region (tests stub them at botocore)."""
    import boto3

    session = boto3.Session(region_name=region)
    if session.get_credentials() is None:
        raise PlannerError("no AWS credentials found; configure them (aws configure, environment variables, or an "
                           "instance role)")
    return {name: session.client(name) for name in ("s3", "sts", "service-quotas")}


def aws_enabled() -> Problem | None:
    """Whether SkyPilot may launch on AWS (what `sky check` records), asked of its API server."""
    import sky
    from sky.client import sdk

    try:
        clouds = sky.get(sdk.enabled_clouds())
    except Exception as exc:  # no server, server cannot start: one line, with the fix
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Problem(message=f"cannot ask SkyPilot which clouds are enabled ({text[:200]})",
                       fix="start its API server (sky api start) or log in to yours (sky api login), then "
                           "sky check aws")
    if not any(str(c).lower() == "aws" for c in clouds or []):
        return Problem(message="AWS is not enabled for SkyPilot",
                       fix="run: sky check aws (it needs your AWS credentials; see its output for what is missing)")
    return None


def family(instance_type: str) -> str:
    """EC2 family letters: g6e.xlarge -> g, p4d.24xlarge -> p, vt1.3xlarge -> vt."""
    return re.match(r"[a-z]+", instance_type).group(0) if re.match(r"[a-z]+", instance_type) else ""


def quota_problem(quotas_client, instance_type: str, count: int, spot: bool) -> Problem | None:
    """The region's vCPU quota for the instance family against what the plan starts; None when it suffices or
    cannot be read (quotas are advisory: a permission or an unknown family means unknown, not a problem)."""
    rule = ec2_quotas().for_family(family(instance_type))
    try:
        vcpus = get_instance(instance_type).vcpus
    except PlannerError:
        return None
    if rule is None or not vcpus:
        return None
    code = rule.spot if spot else rule.on_demand
    try:
        try:
            value = quotas_client.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
        except quotas_client.exceptions.NoSuchResourceException:
            value = quotas_client.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"]
    except Exception:
        return None
    needed = vcpus * count
    if value >= needed:
        return None
    market = "spot" if spot else "on-demand"
    return Problem(message=f"the account's {market} vCPU quota for {rule.name} instances in this region is "
                           f"{value:g}; {count} x {instance_type} need {needed:g}",
                   fix=f"request an increase of quota {code} (Service Quotas console, EC2) to at least {needed:g}")
