"""The run's bucket (boto3): where the nodes keep checkpoints and leave the outputs, which `ftplan run` then
downloads. A bucket mount works the same for a cluster and a managed job, survives teardown and preemption,
and needs no SSH (SkyPilot's SDK writes no ssh config and has no rsync)."""

from __future__ import annotations

import re
from pathlib import Path

from ftplan.api import PlannerError

CHECKPOINT_KEY = re.compile(r"(?:^|/)checkpoint-(\d+)/manifest\.json$")
FETCHED = ("adapter/", "model/", "job-summary.json", "job-metrics.jsonl")  # checkpoints stay in the bucket


def split(uri: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix without slashes at its ends)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def location(bucket_option: str | None, region: str, name: str, account: str | None) -> str:
    """s3://BUCKET/PREFIX/<run name>: --option bucket (a name or s3://name/prefix), else ftplan-<region>-<account>
    (as SageMaker's default bucket is named), which `ensure_bucket` creates when missing."""
    if bucket_option:
        bucket, prefix = split(bucket_option if bucket_option.startswith("s3://") else f"s3://{bucket_option}")
        prefix = f"{prefix}/ftplan" if prefix else "ftplan"
    else:
        bucket, prefix = f"ftplan-{region}-{account or '<ACCOUNT>'}", "runs"
    return f"s3://{bucket}/{prefix}/{name}"


def ensure_bucket(s3, bucket: str, region: str) -> None:
    """Create the default bucket in the plan's region when it does not exist yet."""
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except Exception as exc:  # botocore ClientError 404/NoSuchBucket; a 403 is someone else's bucket
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise
    config = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=bucket, **config)


def checkpoint_steps(s3, uri: str) -> list[int]:
    """The steps of the complete checkpoints (manifest present) under the run's prefix."""
    bucket, prefix = split(uri)
    steps = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found = CHECKPOINT_KEY.search(item["Key"][len(prefix) + 1:])
            if found:
                steps.append(int(found.group(1)))
    return sorted(steps)


def download(s3, uri: str, output_dir: Path) -> list[str]:
    """The outputs the nodes left under the run's prefix (adapter or model, job summary and metrics), into
    output_dir; keys that would land outside it are refused. Returns the top-level names written."""
    bucket, prefix = split(uri)
    root = output_dir.resolve()
    written: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix) + 1:]
            if not relative.startswith(FETCHED) or relative.endswith("/"):
                continue
            target = (root / relative).resolve()
            if not target.is_relative_to(root):
                raise PlannerError(f"refused s3://{bucket}/{item['Key']}: it would be written outside {output_dir}")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            written.add(relative.split("/")[0])
    return sorted(written)
