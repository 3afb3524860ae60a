"""The bundled SageMaker trainer backend: the plan as a managed training job on ml.* instances."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

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
    install_extras,
    pricing_rules,
    user_dir,
    weights_source,
)
from ftplan.api import plan_to_yaml as to_yaml

from . import job


class SageMakerOptions(BackendOptions):
    """`ftplan run --backend sagemaker --option KEY=VALUE` (role and bucket also from the environment
    or $FTPLAN_HOME/config.yaml under `sagemaker:`)."""

    role: str | None = Field(None, description="IAM role ARN the job runs as (or FTPLAN_SAGEMAKER_ROLE)")
    bucket: str | None = Field(None, description="S3 bucket [default: FTPLAN_SAGEMAKER_BUCKET, else "
                                                 "sagemaker-<region>-<account>]")
    prefix: str = "ftplan"
    image_uri: str | None = Field(None, description="training image [default: the newest catalogued Hugging Face "
                                                    "training DLC for the region and GPU]")
    volume_gb: int = Field(100, gt=0)
    runtime_margin: float = Field(1.5, ge=1.0, description="MaxRuntime = planned hours x this")
    job_name: str | None = Field(None, pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
    wait: bool = Field(True, description="follow the job until it ends and download the artifacts")
    poll_seconds: float = Field(30.0, gt=0)


def _configured(key: str) -> str | None:
    """FTPLAN_SAGEMAKER_<KEY>, else `sagemaker: {key: ...}` in $FTPLAN_HOME/config.yaml."""
    value = os.environ.get(f"FTPLAN_SAGEMAKER_{key.upper()}")
    if value:
        return value
    path = user_dir() / "config.yaml"
    if path.exists():
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            raise PlannerError(f"{path} is not valid YAML; fix it or remove it") from None
        section = data.get("sagemaker") if isinstance(data, dict) else None
        if isinstance(section, dict) and isinstance(section.get(key), str):
            return section[key]
    return None


def clients(region: str) -> dict[str, Any]:
    """boto3 clients for the job's region (tests replace this)."""
    import boto3

    session = boto3.Session(region_name=region)
    return {name: session.client(name) for name in ("s3", "sagemaker", "logs", "sts", "service-quotas")}


class SageMakerBackend(TrainerBackend):
    """Runs the plan as a SageMaker training job; inside it, ftplan's own Hugging Face backend trains."""

    name = "sagemaker"
    description = "a SageMaker training job on the plan's ml.* instances (ftplan's hf backend inside)"
    methods = ("full", "lora", "qlora")
    platforms = ("sagemaker",)
    options_model = SageMakerOptions

    def parse_options(self, raw: dict[str, Any]) -> SageMakerOptions:
        options = SageMakerOptions.model_validate(raw)
        return options.model_copy(update={"role": options.role or _configured("role"),
                                          "bucket": options.bucket or _configured("bucket")})

    def check(self, plan: Plan, request: RunRequest, options: SageMakerOptions) -> list[Problem]:
        problems = self.supports(plan)
        if importlib.util.find_spec("boto3") is None:
            return problems + [Problem(message="boto3 is not installed", fix="pip install 'ftplan[aws]'")]
        offered = pricing_rules().sagemaker.training_instance_types
        if plan.hardware.instance_type.removeprefix("ml.") not in offered:
            problems.append(Problem(message=f"SageMaker does not offer {job.ml_type(plan)} for training",
                                    fix="re-plan with ftplan recommend --platform sagemaker"))
        if not options.role:
            problems.append(Problem(message="no IAM role for the job",
                                    fix="pass --role arn:aws:iam::ACCOUNT:role/NAME or set FTPLAN_SAGEMAKER_ROLE"))
        if request.dry_run:
            return problems
        import boto3

        if boto3.Session(region_name=plan.hardware.region).get_credentials() is None:
            problems.append(Problem(message="no AWS credentials found",
                                    fix="configure them (aws configure, environment, or an instance role)"))
            return problems
        problems += self._quota_problems(plan)
        return problems

    def _quota_problems(self, plan: Plan) -> list[Problem]:
        """The account's training quota for the instance type, when it can be read."""
        wanted = f"{job.ml_type(plan)} for training job usage"
        try:
            pages = clients(plan.hardware.region)["service-quotas"].get_paginator("list_service_quotas")
            for page in pages.paginate(ServiceCode="sagemaker"):
                for quota in page.get("Quotas", []):
                    if quota.get("QuotaName") == wanted and quota.get("Value", 0) < plan.hardware.instance_count:
                        return [Problem(message=f"the account's quota '{wanted}' is {quota['Value']:g}, the plan "
                                                f"needs {plan.hardware.instance_count}",
                                        fix="request a quota increase in the Service Quotas console")]
        except Exception:  # quotas are advisory: unreadable (permissions, moto) means unknown, not a problem
            return []
        return []

    def _image(self, plan: Plan, options: SageMakerOptions) -> tuple[str, str]:
        """The training image and why it was chosen."""
        if options.image_uri:
            return options.image_uri, "--option image_uri"
        return job.choose_image(plan)

    def _bucket(self, plan: Plan, options: SageMakerOptions, sts) -> str:
        if options.bucket:
            return options.bucket
        if sts is None:
            raise PlannerError("no S3 bucket: pass --option bucket=NAME or set FTPLAN_SAGEMAKER_BUCKET")
        account = sts.get_caller_identity()["Account"]
        return f"sagemaker-{plan.hardware.region}-{account}"

    def _request(self, plan: Plan, request: RunRequest, options: SageMakerOptions,
                 sts) -> tuple[dict, Path | None, str]:
        """The create_training_job request, the local model directory to upload (if any), why that image."""
        source = weights_source(plan, request.model_path)
        model_dir = Path(source).expanduser() if source and Path(source).expanduser().is_dir() else None
        name = options.job_name or job.job_name(plan)
        image, why = self._image(plan, options)
        return job.training_request(plan, name=name, role=options.role or "", bucket=self._bucket(plan, options, sts),
                                    prefix=options.prefix, image=image, volume_gb=options.volume_gb,
                                    runtime_margin=options.runtime_margin, model_channel=model_dir is not None), \
            model_dir, why

    def dry_run(self, plan: Plan, request: RunRequest, options: SageMakerOptions) -> dict:
        spec, model_dir, why = self._request(plan, request, options, sts=None)
        return {"create_training_job": spec, "image": {
            "uri": spec["AlgorithmSpecification"]["TrainingImage"], "why": why}, "uploads": {
            "data": str(request.data), "plan": "plan.yaml", "model": str(model_dir) if model_dir else None,
            "source": "ftplan's packages + ftplan_entry.py + requirements.txt"}}

    def run(self, plan: Plan, request: RunRequest, options: SageMakerOptions, progress: ProgressCallback) -> RunResult:
        from botocore.exceptions import BotoCoreError, ClientError

        c = clients(plan.hardware.region)
        notes: list[str] = []
        try:
            spec, model_dir, why = self._request(plan, request, options, c["sts"])
            job.stage(c["s3"], spec, to_yaml(plan), request.data, model_dir, install_extras(plan))
            c["sagemaker"].create_training_job(**spec)
            name = spec["TrainingJobName"]
            image = spec["AlgorithmSpecification"]["TrainingImage"]
            notes.append(f"training job {name} in {plan.hardware.region}; image {image}: {why}")
            if not options.wait:
                return RunResult(output_dir=request.output_dir, artifacts=[], steps=0, total_steps=0, first_loss=None,
                                 final_loss=None, tokens=0, seconds=0, tokens_per_second=0, peak_memory_bytes=None,
                                 device="sagemaker", notes=notes + ["not followed (wait=false)"])
            events: list = []

            def record(event) -> None:
                events.append(event)
                progress(event)

            final = job.follow(c["sagemaker"], c["logs"], name, record, poll_seconds=options.poll_seconds,
                               say=notes.append)
            if final["TrainingJobStatus"] != "Completed":
                raise PlannerError(f"SageMaker training job {name} {final['TrainingJobStatus'].lower()}: "
                                   f"{final.get('FailureReason', 'no reason given')}")
            artifacts = job.download(c["s3"], final["ModelArtifacts"]["S3ModelArtifacts"], request.output_dir)
        except (BotoCoreError, ClientError) as exc:
            raise aws_error(exc, "SageMaker", "nothing more was started") from None
        seconds = float(final.get("TrainingTimeInSeconds") or 0)
        billable = final.get("BillableTimeInSeconds")
        if plan.hardware.market == "spot" and seconds and billable is not None:
            notes.append(f"managed spot saved {100 * (1 - billable / seconds):.0f}% "
                         f"({billable} billable of {seconds:.0f} s)")
        last = events[-1] if events else None
        return RunResult(
            output_dir=request.output_dir, artifacts=artifacts, steps=last.step if last else 0,
            total_steps=last.total_steps if last else 0, first_loss=events[0].loss if events else None,
            final_loss=last.loss if last else None, tokens=last.tokens if last else 0, seconds=seconds,
            tokens_per_second=last.tokens_per_second if last else 0.0,
            peak_memory_bytes=last.peak_memory_bytes if last else None, device="sagemaker",
            gpu_name=plan.hardware.gpu, notes=notes)
