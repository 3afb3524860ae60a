"""The SageMaker backend: the exact request (dry run), S3 staging and the job's life cycle under
moto (which accepts jobs shallowly, so the request itself is asserted), failure and spot paths,
and the in-container entry script, run for real on a tiny model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from ftplan.backends.sagemaker import backend as sm_backend  # noqa: E402
from ftplan.backends.sagemaker import entry, job  # noqa: E402
from ftplan.errors import PlannerError  # noqa: E402
from ftplan.plan import load  # noqa: E402
from ftplan.run import registry as plugins  # noqa: E402
from ftplan.run.backend import RunRequest  # noqa: E402
from ftplan.run.execute import execute, prepare  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

ROLE = "arn:aws:iam::123456789012:role/ftplan-training"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Accepted SageMaker plans (spot and on-demand) for llama2-7b, and a small dataset."""
    root = tmp_path_factory.mktemp("sagemaker")
    for name, extra in (("spot.yaml", ["--spot"]), ("ondemand.yaml", [])):
        result = run_cli("recommend", "llama2-7b", "--tokens", "20M", "--platform", "sagemaker", "--backend",
                         "sagemaker", "--max-gpus", "1", "--priority", "cost", "--yes", "-o", name, *extra, cwd=root)
        assert result.returncode == 0, result.stderr
    (root / "train.jsonl").write_text('{"text": "hello world"}\n')
    return root


def test_dry_run_prints_the_exact_request_and_writes_nothing(plans):
    plan = load(plans / "spot.yaml")
    before = sorted(p.name for p in plans.iterdir())
    result = run_cli("run", "spot.yaml", "--data", "train.jsonl", "--dry-run", "--json", "--option", f"role={ROLE}",
                     "--option", "bucket=ftplan-test", "--option", "job_name=ftplan-test-job", cwd=plans)
    assert result.returncode == 0, result.stderr
    request = json.loads(result.stdout)["create_training_job"]
    base = "s3://ftplan-test/ftplan/ftplan-test-job"
    assert plan.hardware.instance_type.startswith("ml.") and plan.backend == "sagemaker"  # SageMaker's own names
    assert request["ResourceConfig"] == {"InstanceType": plan.hardware.instance_type,
                                         "InstanceCount": plan.hardware.instance_count, "VolumeSizeInGB": 100}
    assert request["EnableManagedSpotTraining"] is True
    runtime = request["StoppingCondition"]["MaxRuntimeInSeconds"]
    assert runtime == max(3600, int(plan.estimates.hours * 3600 * 1.5))
    assert request["StoppingCondition"]["MaxWaitTimeInSeconds"] == 2 * runtime
    assert request["CheckpointConfig"] == {"S3Uri": f"{base}/checkpoints/", "LocalPath": "/opt/ml/checkpoints"}
    assert request["HyperParameters"] == {"sagemaker_program": '"ftplan_entry.py"',
                                          "sagemaker_submit_directory": f'"{base}/source/sourcedir.tar.gz"',
                                          "sagemaker_region": '"us-east-1"'}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels == {"train": f"{base}/data/", "plan": f"{base}/plan/"}
    assert request["OutputDataConfig"] == {"S3OutputPath": f"{base}/output"}
    assert request["RoleArn"] == ROLE
    tags = {t["Key"]: t["Value"] for t in request["Tags"]}
    assert tags["ftplan:model"] == "llama2-7b" and tags["ftplan:method"] == plan.training.method
    # a published image (catalogs/sagemaker_images.json), not a tag built from the versions installed here
    newest = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:" \
        "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04"
    assert request["AlgorithmSpecification"]["TrainingImage"] == newest
    image = json.loads(result.stdout)["image"]
    assert image["uri"] == newest and "transformers >= 5.0" in image["why"] and "requirements.txt" in image["why"]
    assert sorted(p.name for p in plans.iterdir()) == before


def test_on_demand_plans_have_no_spot_settings(plans):
    result = run_cli("run", "ondemand.yaml", "--data", "train.jsonl", "--dry-run", "--json", "--option",
                     f"role={ROLE}", "--option", "bucket=b", cwd=plans)
    request = json.loads(result.stdout)["create_training_job"]
    assert request["EnableManagedSpotTraining"] is False
    assert "MaxWaitTimeInSeconds" not in request["StoppingCondition"]


def test_check_names_what_stops_the_job(plans, tmp_path, monkeypatch):
    plan = yaml.safe_load((plans / "spot.yaml").read_text())
    plan["hardware"]["instance_type"] = "g4dn.metal"
    (tmp_path / "metal.yaml").write_text(yaml.safe_dump(plan))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    result = run_cli("run", "metal.yaml", "--data", "d.jsonl", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "does not offer ml.g4dn.metal for training" in result.stderr and "no IAM role" in result.stderr
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    no_credentials = run_cli("run", str(plans / "spot.yaml"), "--data", "d.jsonl", "--option", f"role={ROLE}", env=env,
                             cwd=tmp_path)
    assert no_credentials.returncode == 2 and "no AWS credentials found" in no_credentials.stderr
    assert not (tmp_path / "ftplan-output").exists()


def test_the_image_is_the_newest_published_one_the_region_and_gpu_allow(plans, monkeypatch):
    from ftplan.api import sagemaker_images

    catalog = sagemaker_images()
    plan = load(plans / "spot.yaml")
    tags = {i.tag for i in catalog.images}
    assert all(uri.split(":")[-1] in tags for uri in [job.choose_image(plan)[0]])
    # another region's registry and DNS suffix
    beijing = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"region": "cn-north-1"})})
    assert job.choose_image(beijing)[0].startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    nowhere = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"region": "xx-nowhere-1"})})
    with pytest.raises(PlannerError, match="no Hugging Face training image is published in xx-nowhere-1"):
        job.choose_image(nowhere)
    # with a lower requirement the choice is still the newest; Blackwell keeps only CUDA >= 12.8 images
    monkeypatch.setattr(job, "train_minimums", lambda: {"torch": (2, 0)})
    b200 = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"gpu": "B200"})})
    uri, why = job.choose_image(b200)
    assert "cu130" in uri and "Blackwell" in why
    older = [i for i in catalog.images if i.cuda_number < 128]
    monkeypatch.setattr(job, "sagemaker_images", lambda: catalog.model_copy(update={"images": older}))
    with pytest.raises(PlannerError, match="CUDA >= 12.8"):
        job.choose_image(b200)
    assert "cu12" in job.choose_image(plan)[0] or "cu11" in job.choose_image(plan)[0]


def test_image_uri_option_overrides_the_choice(plans):
    result = run_cli("run", "spot.yaml", "--data", "train.jsonl", "--dry-run", "--json", "--option", f"role={ROLE}",
                     "--option", "bucket=b", "--option", "image_uri=example.com/mine:1", cwd=plans)
    described = json.loads(result.stdout)
    assert described["create_training_job"]["AlgorithmSpecification"]["TrainingImage"] == "example.com/mine:1"
    assert described["image"]["why"] == "--option image_uri"


def test_the_job_installs_ftplans_requirements_with_their_bounds():
    wanted = job.requirements()
    assert "peft>=0.18" in wanted and "accelerate>=1.0" in wanted and "pydantic>=2.6" in wanted
    assert not any(r.startswith(("torch", "transformers", "pytest", "skypilot", "deepspeed")) for r in wanted)
    # a ZeRO plan (a hand edit) runs under DeepSpeed in the job too
    assert any(r.startswith("deepspeed>=") for r in job.requirements(("train", "deepspeed")))


class Recording:
    """A moto client that also keeps the create_training_job request (moto keeps only part of it)
    and can replay scripted describe_training_job answers."""

    def __init__(self, client, script=None):
        self._client, self.requests, self._script = client, [], list(script or [])

    def create_training_job(self, **kwargs):
        self.requests.append(kwargs)
        return self._client.create_training_job(**kwargs)

    def describe_training_job(self, **kwargs):
        real = self._client.describe_training_job(**kwargs)
        return {**real, **self._script.pop(0)} if self._script else real

    def __getattr__(self, name):
        return getattr(self._client, name)


def artifacts_tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, body in (("adapter/adapter_config.json", b"{}"), ("metrics.jsonl", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.fixture
def aws(monkeypatch):
    """moto S3 + SageMaker behind the backend's clients(), with the requests recorded."""
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        session = boto3.Session(region_name="us-east-1")
        made = {name: session.client(name) for name in ("s3", "sagemaker", "logs", "sts", "service-quotas")}
        made["sagemaker"] = Recording(made["sagemaker"])
        made["s3"].create_bucket(Bucket="ftplan-test")
        monkeypatch.setattr(sm_backend, "clients", lambda region: made)
        plugins.reset()
        yield made
        plugins.reset()


def start(plans: Path, tmp_path: Path, plan_name: str = "spot.yaml", **options):
    request = RunRequest(data=plans / "train.jsonl", output_dir=tmp_path / "out")
    raw = {"role": ROLE, "bucket": "ftplan-test", "job_name": "ftplan-test-job", "poll_seconds": 0.01, **options}
    plan, backend, parsed = prepare(plans / plan_name, request, backend_name="sagemaker", raw_options=raw,
                                    force=False)
    return execute(plan, backend, parsed, request, lambda event: None)


def test_a_job_is_staged_started_followed_and_its_artifacts_downloaded(plans, tmp_path, aws):
    aws["s3"].put_object(Bucket="ftplan-test", Key="ftplan/ftplan-test-job/output/ftplan-test-job/output/model.tar.gz",
                         Body=artifacts_tarball())
    summary = start(plans, tmp_path)
    [sent] = aws["sagemaker"].requests
    assert sent["ResourceConfig"]["InstanceType"].startswith("ml.") and sent["EnableManagedSpotTraining"]
    keys = {o["Key"] for o in aws["s3"].list_objects_v2(Bucket="ftplan-test")["Contents"]}
    assert {"ftplan/ftplan-test-job/data/train.jsonl", "ftplan/ftplan-test-job/plan/plan.yaml",
            "ftplan/ftplan-test-job/source/sourcedir.tar.gz"} <= keys
    source = aws["s3"].get_object(Bucket="ftplan-test", Key="ftplan/ftplan-test-job/source/sourcedir.tar.gz")
    names = tarfile.open(fileobj=io.BytesIO(source["Body"].read())).getnames()
    assert "ftplan_entry.py" in names and "ftplan/run/execute.py" in names and "ftplan/catalogs/models.json" in names
    assert "ftplan/backends/hf/loop.py" in names and "ftplan-0.1.0.dist-info/entry_points.txt" in names
    assert "requirements.txt" in names and not any("__pycache__" in n for n in names)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert summary.result.device == "sagemaker" and (tmp_path / "out" / "summary.json").exists()
    tags = aws["sagemaker"].list_tags(ResourceArn=aws["sagemaker"].describe_training_job(
        TrainingJobName="ftplan-test-job")["TrainingJobArn"])["Tags"]
    assert {"Key": "ftplan:model", "Value": "llama2-7b"} in tags


def test_a_failed_job_reports_its_reason(plans, tmp_path, aws):
    aws["sagemaker"]._script = [{"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
                                {"TrainingJobStatus": "Failed", "SecondaryStatus": "Failed",
                                 "FailureReason": "AlgorithmError: CUDA out of memory"}]
    with pytest.raises(PlannerError, match="ftplan-test-job failed: AlgorithmError: CUDA out of memory"):
        start(plans, tmp_path)


def test_an_interrupted_spot_job_is_followed_through_its_restart(plans, tmp_path, aws):
    aws["s3"].put_object(Bucket="ftplan-test", Key="ftplan/ftplan-test-job/output/ftplan-test-job/output/model.tar.gz",
                         Body=artifacts_tarball())
    aws["sagemaker"]._script = [
        {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
        {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Interrupted"},
        {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Restarting"},
        {"TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"},
        {"TrainingJobStatus": "Completed", "SecondaryStatus": "Completed", "TrainingTimeInSeconds": 1000,
         "BillableTimeInSeconds": 300}]
    summary = start(plans, tmp_path)
    notes = summary.result.notes
    assert any("Interrupted" in n for n in notes) and any("Restarting" in n for n in notes)
    assert "managed spot saved 70% (300 billable of 1000 s)" in notes


def test_a_hostile_artifact_archive_cannot_escape(tmp_path, aws):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    aws["s3"].put_object(Bucket="ftplan-test", Key="evil.tar.gz", Body=buffer.getvalue())
    with pytest.raises(PlannerError, match="refused"):
        job.download(aws["s3"], "s3://ftplan-test/evil.tar.gz", tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_the_entry_script_trains_inside_the_container_layout_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("FTPLAN_SAVE_EVERY", "3")
    from examples import tiny_model

    work = tmp_path / "plan"
    tiny_model.make_model(work / "tiny")
    tiny_model.text_data(work / "train.jsonl", n=16)
    assert run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "2",
                   "--methods", "lora", "--max-gpus", "1", "--platform", "sagemaker", "--backend", "sagemaker",
                   "--instances", "g5.xlarge", "--yes", cwd=work).returncode == 0
    opt = tmp_path / "opt-ml"
    for channel, source in (("train", work / "train.jsonl"), ("plan", work / "ftplan-plan.yaml")):
        (opt / "input" / channel).mkdir(parents=True)
        (opt / "input" / channel / source.name.replace("ftplan-plan", "plan")).write_bytes(source.read_bytes())
    import shutil

    shutil.copytree(work / "tiny", opt / "input" / "model")
    checkpoints, model = opt / "checkpoints", opt / "model"
    assert not entry.resuming(checkpoints / entry.RUN_DIR_NAME)
    assert entry.main(opt / "input", checkpoints, model) == 0
    assert (model / "adapter" / "adapter_model.safetensors").exists() and (model / "job-summary.json").exists()
    # a spot restart finds the synced checkpoint and resumes from it
    assert entry.resuming(checkpoints / entry.RUN_DIR_NAME)
    assert entry.main(opt / "input", checkpoints, model) == 0
    summary = json.loads((model / "job-summary.json").read_text())
    assert summary["result"]["resumed_from_step"] == 6 and summary["result"]["steps"] == 8
