"""A plan as a SageMaker training job: the request (pure), staging to S3, following, downloading."""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ftplan.api import (
    Plan,
    PlannerError,
    ProgressEvent,
    __version__,
    dist_info_files,
    get_gpu,
    sagemaker_images,
    source_files,
)

MAX_RUNTIME = 28 * 24 * 3600      # SageMaker's ceiling for a training job
MIN_RUNTIME = 3600
ENTRY = "ftplan_entry.py"
# installed on top of the image when this ftplan's metadata cannot be read; torch and transformers are the image's
REQUIREMENTS = ("peft", "bitsandbytes", "accelerate", "safetensors", "pydantic>=2.6", "click", "rich", "pluggy",
                "PyYAML", "huggingface_hub")
IMAGE_PROVIDES = ("torch", "transformers")


def requirements(extras: tuple[str, ...] = ("train",)) -> list[str]:
    """requirements.txt for the job: ftplan's dependencies and `extras` (train; deepspeed for a ZeRO plan) as
    installed here, with their version bounds (the image's own peft or accelerate may be older than ftplan needs),
    less what the image provides."""
    from importlib import metadata

    try:
        requires = metadata.requires("ftplan") or []
    except metadata.PackageNotFoundError:
        return list(REQUIREMENTS)
    kept = []
    for line in requires:
        requirement, _, marker = line.partition(";")
        name = re.match(r"[A-Za-z0-9_.\-]+", requirement.strip()).group(0).lower()
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if name not in IMAGE_PROVIDES and (not marker.strip() or (extra and extra.group(1) in extras)):
            kept.append(requirement.strip())
    return kept or list(REQUIREMENTS)


def job_name(plan: Plan, now: datetime | None = None) -> str:
    """ftplan-<model>-<method>-<UTC timestamp>: at most 63 characters of [a-zA-Z0-9-]."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    model = re.sub(r"[^a-zA-Z0-9-]+", "-", plan.model.name).strip("-")[:30] or "model"
    return f"ftplan-{model}-{plan.training.method}-{stamp}"[:63].rstrip("-")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def train_minimums() -> dict[str, tuple[int, ...]]:
    """The lowest torch and transformers ftplan's `train` extra accepts, from this installation's metadata
    (nothing when it cannot be read: then every catalogued image qualifies)."""
    from importlib import metadata

    try:
        requires = metadata.requires("ftplan") or []
    except metadata.PackageNotFoundError:
        return {}
    found = {}
    for line in requires:
        match = re.match(r"^(torch|transformers)\s*>=\s*([\d.]+)", line)
        if match and "train" in line:
            found[match.group(1)] = _version(match.group(2))
    return found


def choose_image(plan: Plan) -> tuple[str, str]:
    """The training image for the plan, and why: the newest catalogued Hugging Face training DLC published in the
    plan's region whose PyTorch and transformers meet ftplan's train extra and whose CUDA runs the plan's GPU."""
    catalog = sagemaker_images()
    region = plan.hardware.region
    if region not in catalog.registries:
        raise PlannerError(f"no Hugging Face training image is published in {region} (catalogs/sagemaker_images.json); "
                           "pass --option image_uri=... or re-plan in another --region")
    minimums = train_minimums()
    images = [i for i in catalog.images if _version(i.pytorch) >= minimums.get("torch", ())
              and _version(i.transformers) >= minimums.get("transformers", ())]
    reasons = [f"PyTorch >= {'.'.join(map(str, minimums['torch']))}" if "torch" in minimums else "",
               f"transformers >= {'.'.join(map(str, minimums['transformers']))}" if "transformers" in minimums else ""]
    gpu = get_gpu(plan.hardware.gpu)
    if gpu.architecture == "blackwell":
        images = [i for i in images if i.cuda_number >= catalog.blackwell_min_cuda]
        reasons.append(f"CUDA >= {catalog.blackwell_min_cuda / 10:.1f} for the {gpu.name} (Blackwell)")
    if not images:
        raise PlannerError(f"no catalogued Hugging Face training image has {', '.join(r for r in reasons if r)}; "
                           "pass --option image_uri=...")
    image = max(images, key=lambda i: (_version(i.pytorch), _version(i.transformers)))
    needs = ", ".join(r for r in reasons if r)
    why = (f"the newest Hugging Face training image in {region} ({image.tag}, catalogued {catalog.date})"
           + (f" with {needs} (ftplan's train extra and the plan's GPU)" if needs else "")
           + "; ftplan's other requirements are installed on top from requirements.txt")
    return catalog.uri(image, region), why


def ml_type(plan: Plan) -> str:
    """The plan's instance type as SageMaker names it (plans written by recommend already say ml.*)."""
    return "ml." + plan.hardware.instance_type.removeprefix("ml.")


def max_runtime(plan: Plan, margin: float) -> int:
    """The plan's billed hours with a margin, within SageMaker's limits."""
    return int(min(MAX_RUNTIME, max(MIN_RUNTIME, plan.estimates.hours * 3600 * margin)))


def _tag(value: str) -> str:
    return re.sub(r"[^\w.:/=+\-@ ]", "_", value)[:256]


def training_request(plan: Plan, *, name: str, role: str, bucket: str, prefix: str, image: str, volume_gb: int,
                     runtime_margin: float, model_channel: bool) -> dict:
    """The exact create_training_job request for `plan` (no I/O)."""
    base = f"s3://{bucket}/{prefix.strip('/')}/{name}"
    hw = plan.hardware
    spot = hw.market == "spot"
    runtime = max_runtime(plan, runtime_margin)

    def channel(channel_name: str, uri: str) -> dict:
        return {"ChannelName": channel_name, "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}

    channels = [channel("train", f"{base}/data/"), channel("plan", f"{base}/plan/")]
    if model_channel:
        channels.append(channel("model", f"{base}/model/"))
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {
            "TrainingImage": image, "TrainingInputMode": "File",
            "MetricDefinitions": [{"Name": "train:loss", "Regex": r'ftplan-metric .*"loss":([0-9.eE+-]+)'},
                                  {"Name": "train:tokens_per_second",
                                   "Regex": r'ftplan-metric .*"tokens_per_second":([0-9.eE+-]+)'}]},
        "RoleArn": role,
        # the sagemaker-training toolkit in the Hugging Face containers reads JSON-encoded strings
        "HyperParameters": {"sagemaker_program": json.dumps(ENTRY),
                            "sagemaker_submit_directory": json.dumps(f"{base}/source/sourcedir.tar.gz"),
                            "sagemaker_region": json.dumps(hw.region)},
        "InputDataConfig": channels,
        "OutputDataConfig": {"S3OutputPath": f"{base}/output"},
        "ResourceConfig": {"InstanceType": ml_type(plan), "InstanceCount": hw.instance_count,
                           "VolumeSizeInGB": volume_gb},
        "StoppingCondition": {"MaxRuntimeInSeconds": runtime},
        "EnableManagedSpotTraining": spot,
        "Environment": {"FTPLAN_PLUGINS": "hf", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        "Tags": [{"Key": "ftplan:model", "Value": _tag(plan.model.name)},
                 {"Key": "ftplan:method", "Value": plan.training.method},
                 {"Key": "ftplan:plan", "Value": _tag(f"{plan.model.config_sha256[:12]} {plan.created_at}")},
                 {"Key": "ftplan:version", "Value": __version__}],
    }
    if spot:  # managed spot: wait up to twice the runtime for capacity; resume from the synced checkpoints
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = min(MAX_RUNTIME, 2 * runtime)
    # on-demand jobs checkpoint to S3 too, so a failed job can be continued
    request["CheckpointConfig"] = {"S3Uri": f"{base}/checkpoints/", "LocalPath": "/opt/ml/checkpoints"}
    return request


def source_tarball(extras: tuple[str, ...] = ("train",)) -> bytes:
    """ftplan's own packages, the entry script and requirements.txt, as sourcedir.tar.gz."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in source_files():
            tar.add(path, arcname=name)
        tar.add(Path(__file__).with_name("entry.py"), arcname=ENTRY)
        texts = {**dist_info_files(), "requirements.txt": "\n".join(requirements(extras)) + "\n"}
        for name, text in texts.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def stage(s3, request: dict, plan_yaml: str, data: Path, model_dir: Path | None,
          extras: tuple[str, ...] = ("train",)) -> list[str]:
    """Upload the data, the plan, the model directory (if local) and the source; returns the URIs."""
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    uploads: list[tuple[Path | bytes, str]] = []
    files = [p for p in sorted(data.rglob("*")) if p.is_file()] if data.is_dir() else [data]
    for f in files:
        uploads.append((f, channels["train"] + (str(f.relative_to(data)) if data.is_dir() else f.name)))
    if model_dir is not None:
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                uploads.append((f, channels["model"] + str(f.relative_to(model_dir))))
    uploads.append((plan_yaml.encode(), channels["plan"] + "plan.yaml"))
    uploads.append((source_tarball(extras), json.loads(request["HyperParameters"]["sagemaker_submit_directory"])))
    for body, uri in uploads:
        bucket, key = _split(uri)
        if isinstance(body, Path):
            s3.upload_file(str(body), bucket, key)
        else:
            s3.put_object(Bucket=bucket, Key=key, Body=body)
    return [uri for _, uri in uploads]


TERMINAL = {"Completed", "Failed", "Stopped"}


def follow(sagemaker, logs, name: str, progress: Callable[[ProgressEvent], None], *, poll_seconds: float,
           say: Callable[[str], None], sleep=time.sleep) -> dict:
    """Poll the job until it ends, passing its secondary status to `say` and its metric lines to `progress`."""
    seen_status, log_state = None, {}
    while True:
        job = sagemaker.describe_training_job(TrainingJobName=name)
        status = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
        if status != seen_status:
            message = (job.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
            say(f"{name}: {status[0]} / {status[1]}" + (f" - {message}" if message else ""))
            seen_status = status
        _read_logs(logs, name, log_state, progress)
        if job["TrainingJobStatus"] in TERMINAL:
            return job
        sleep(poll_seconds)


def _read_logs(logs, name: str, state: dict, progress: Callable[[ProgressEvent], None]) -> None:
    """New `ftplan-metric` lines from the job's CloudWatch streams (absent streams are fine)."""
    if logs is None:
        return
    try:
        streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs",
                                            logStreamNamePrefix=name).get("logStreams", [])
        for stream in streams:
            stream_name = stream["logStreamName"]
            kwargs = {"logGroupName": "/aws/sagemaker/TrainingJobs", "logStreamName": stream_name,
                      "startFromHead": True}
            if stream_name in state:
                kwargs["nextToken"] = state[stream_name]
            page = logs.get_log_events(**kwargs)
            state[stream_name] = page.get("nextForwardToken")
            for event in page.get("events", []):
                text = event.get("message", "")
                if text.startswith("ftplan-metric "):
                    try:
                        progress(ProgressEvent.model_validate_json(text.removeprefix("ftplan-metric ")))
                    except ValueError:
                        continue
    except Exception as exc:  # logs are a courtesy: a missing group or permission must not stop the job
        if type(exc).__name__ not in ("ResourceNotFoundException", "ClientError"):
            raise


def download(s3, artifacts_uri: str, output_dir: Path) -> list[str]:
    """Fetch model.tar.gz and unpack it into output_dir; member paths cannot escape it."""
    bucket, key = _split(artifacts_uri)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    output_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        try:
            tar.extractall(output_dir, filter="data")
        except tarfile.FilterError as exc:
            raise PlannerError(f"refused {artifacts_uri}: {exc}") from None
        return sorted({m.name.split("/")[0] for m in tar.getmembers()})
