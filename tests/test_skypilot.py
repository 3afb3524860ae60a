"""The skypilot backend without a network: the task it generates is parsed and validated by SkyPilot's own Task and
Resources on a small catalog seeded under a temporary HOME; launching, following, cancelling and tearing down go
through SkyPilot's SDK functions, faked at that boundary; S3 is moto behind real boto3 clients."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("sky")
boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

from examples import tiny_model  # noqa: E402
from ftplan.backends.skypilot import cloud, storage, task  # noqa: E402
from ftplan.errors import PlannerError  # noqa: E402
from ftplan.plan import load  # noqa: E402
from ftplan.run import registry as plugins  # noqa: E402
from ftplan.run.backend import RunRequest, RunResult  # noqa: E402
from ftplan.run.execute import execute, prepare  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

HEADER = ["InstanceType", "AcceleratorName", "AcceleratorCount", "vCPUs", "MemoryGiB", "GpuInfo", "Price", "SpotPrice",
          "Region", "AvailabilityZone", "Arch", "LocalDiskType", "NVMeSupported", "LocalDiskSize", "LocalDiskCount",
          "MaximumEfaInterfaces"]
SEEDED = ("g5.xlarge", "g6e.xlarge", "g5.12xlarge")


def seed_catalog(root: Path) -> None:
    """A fresh, small SkyPilot AWS catalog from ftplan's own instance catalog. No .meta/*.md5 is written, so
    SkyPilot treats the files as edited by hand and never downloads them again."""
    from ftplan.data.catalog import get_gpu, get_instance

    (root / "aws").mkdir(parents=True, exist_ok=True)
    (root / "common").mkdir(parents=True, exist_ok=True)
    rows, gpus = [], set()
    for name in SEEDED:
        inst = get_instance(name)
        gpu = get_gpu(inst.gpu)
        mib = gpu.memory_bytes // 2**20
        info = str({"Gpus": [{"Name": gpu.name, "Manufacturer": "NVIDIA", "Count": inst.gpu_count,
                              "MemoryInfo": {"SizeInMiB": mib}}], "TotalGpuMemoryInMiB": mib * inst.gpu_count})
        price = inst.prices[0].usd_per_hour
        for zone in ("use1-az1", "use1-az2"):
            rows.append([name, gpu.name, float(inst.gpu_count), float(inst.vcpus), inst.memory_gib, info, price,
                         round(price * 0.4, 4), "us-east-1", zone, "x86_64", "ssd", True, 250.0, 1.0, ""])
        gpus.add(gpu.name)
    with open(root / "aws" / "vms.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER, *rows])
    with open(root / "common" / "accelerators.csv", "w", newline="") as f:
        csv.writer(f).writerows([["AcceleratorName", "Clouds"], *[[g, "['AWS']"] for g in sorted(gpus)]])


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """SkyPilot imported under a temporary HOME with a seeded catalog; no API server may start."""
    home = tmp_path_factory.mktemp("skyhome")
    saved = {k: os.environ.get(k) for k in ("HOME", "SKY_RUNTIME_DIR", "SKYPILOT_DISABLE_LOCAL_API_SERVER")}
    os.environ.update(HOME=str(home), SKYPILOT_DISABLE_LOCAL_API_SERVER="1")
    os.environ.pop("SKY_RUNTIME_DIR", None)
    import sky as sky_module
    from sky.catalog import common
    from sky.utils import annotations

    seed_catalog(Path(common._ABSOLUTE_VERSIONED_CATALOG_DIR))
    annotations.is_on_api_server = False  # keeps SkyPilot's spinner control codes off stdout in-process
    yield sky_module
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model, data, and plans made by recommend for EC2 (on-demand, spot, and two instances)."""
    root = tmp_path_factory.mktemp("skypilot")
    tiny_model.make_model(root / "tiny")
    tiny_model.text_data(root / "train.jsonl", n=32)
    args = ("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "4",
            "--methods", "lora", "--instances", "g5.xlarge", "--max-gpus", "1", "--lr", "3e-3", "--yes", "--force")
    for name, extra in (("ondemand.yaml", ()), ("spot.yaml", ("--spot",))):
        made = run_cli(*args, "-o", name, *extra, cwd=root)
        assert made.returncode == 0, made.stderr
    two = yaml.safe_load((root / "ondemand.yaml").read_text())
    two["hardware"]["instance_count"] = 2  # at half the micro-batch: the same global batch, as plans must keep
    assert two["training"]["setup"]["batch_size"] == 4 and two["training"]["grad_accum"] == 1
    two["training"]["setup"]["batch_size"] = 2
    (root / "two.yaml").write_text(yaml.safe_dump(two))
    return root


def test_recommend_names_skypilot_for_ec2_plans(work):
    plan = load(work / "ondemand.yaml")
    assert plan.backend == "skypilot" and plan.hardware.platform == "ec2"


def test_the_task_parses_and_validates_with_skypilots_own_task_and_resources(sky, work, tmp_path):
    plan = load(work / "two.yaml")
    request = RunRequest(data=work / "train.jsonl", eval_data=work / "train.jsonl", output_dir=tmp_path / "out",
                         max_steps=5)
    staged = tmp_path / "staged"
    written = task.stage(staged, (work / "two.yaml").read_text())
    assert "src/ftplan/backends/hf/loop.py" in written and "src/ftplan/catalogs/models.json" in written
    config = task.task_config(plan, request, name="ftplan-tiny-lora-1", workdir=str(staged),
                              bucket_uri="s3://my-bucket/ftplan/run-1", install="source", disk_gb=100)
    built = cloud.build_task(config, {"HF_TOKEN": "hf_secret_value"})
    assert built.num_nodes == 2 and built.name == "ftplan-tiny-lora-1"
    [resources] = list(built.resources)
    assert resources.instance_type == "g5.xlarge" and not resources.use_spot
    assert str(resources.cloud) == "AWS" and resources.region == "us-east-1"
    assert resources.accelerators == {"A10G": 1}  # SkyPilot's catalog knows the instance's GPU
    assert built.file_mounts["/ftplan/data/train.jsonl"] == str(work / "train.jsonl")
    assert built.file_mounts[task.MODEL_DIR] == str(work / "tiny")
    assert built.storage_mounts[task.BUCKET_DIR].source == "s3://my-bucket/ftplan/run-1"
    assert built.workdir == str(staged) and "hf_secret_value" not in json.dumps(config)
    assert "--model-path /ftplan/model" in built.run and "--max-steps 5" in built.run
    assert "pip install --quiet '.[train]'" in built.setup
    spot = load(work / "spot.yaml")
    spot_task = cloud.build_task(task.task_config(spot, request, name="s", workdir=str(staged),
                                                  bucket_uri="s3://b/p", install="release", disk_gb=100), {})
    [spot_resources] = list(spot_task.resources)
    assert spot_resources.use_spot and "ftplan[train]==" in spot_task.setup
    # a ZeRO plan (a hand edit) runs under DeepSpeed: its nodes install the deepspeed extra the staged source declares
    zero = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"sharding": "zero3"})})
    zero_task = task.task_config(zero, request, name="z", workdir=str(staged), bucket_uri="s3://b/p",
                                 install="source", disk_gb=100)
    assert "pip install --quiet '.[train,deepspeed]'" in zero_task["setup"]
    assert "deepspeed = [\"deepspeed>=" in (staged / "pyproject.toml").read_text()
    wrong = plan.model_copy(update={"hardware": plan.hardware.model_copy(update={"instance_type": "g5.nonexistent"})})
    with pytest.raises(ValueError, match="Invalid instance type"):
        cloud.build_task(task.task_config(wrong, request, name="x", workdir=str(staged), bucket_uri="s3://b/p",
                                          install="source", disk_gb=100), {})


def test_the_staged_source_builds_into_an_ftplan_with_its_entry_points(tmp_path):
    import subprocess
    import zipfile

    task.stage(tmp_path / "staged", "plan: here\n")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path / "dist"), str(tmp_path / "staged")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("ftplan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ftplan/backends/hf/loop.py" in names and "ftplan/catalogs/gpus.json" in names
    assert "ftplan/backends/skypilot/node.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hf = ftplan.backends.hf" in entry_points and "skypilot = ftplan.backends.skypilot" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: peft>=0.18; extra == \"train\"" in metadata


def test_dry_run_prints_the_task_yaml_and_starts_nothing(work):
    before = sorted(p.name for p in work.iterdir())
    result = run_cli("run", "spot.yaml", "--data", "train.jsonl", "--dry-run", "--option", "bucket=s3://mine/runs",
                     cwd=work, env={"HF_TOKEN": "hf_do_not_print"})
    assert result.returncode == 0, result.stderr
    described = yaml.safe_load(result.stdout)
    config = described["task"]
    assert config["resources"]["instance_type"] == "g5.xlarge" and config["resources"]["use_spot"] is True
    assert config["resources"]["infra"] == "aws/us-east-1" and config["num_nodes"] == 1
    assert config["file_mounts"]["/ftplan/bucket"]["source"].startswith("s3://mine/runs/ftplan/ftplan-tiny-lora-")
    assert "ftplan.backends.skypilot.node" in config["run"] and "pip install" in config["setup"]
    assert described["launch"]["call"] == "sky.jobs.launch"  # spot: a managed job, recovered after preemption
    assert "hf_do_not_print" not in result.stdout + result.stderr
    assert sorted(p.name for p in work.iterdir()) == before
    ondemand = yaml.safe_load(run_cli("run", "ondemand.yaml", "--data", "train.jsonl", "--dry-run", "--option",
                                      "keep=true", cwd=work).stdout)
    assert ondemand["launch"]["call"] == "sky.launch" and ondemand["launch"]["down"] is False
    assert "sky.jobs" not in json.dumps(ondemand["launch"]) and "job_recovery" not in ondemand["task"]["resources"]


# -- launching, following and fetching against a fake SkyPilot SDK -----------------------------------------------
def job_outputs(s3, uri: str, steps: int, *, checkpoint: int | None = None) -> None:
    """What node 0 leaves in the bucket at the end of a job (plugins/skypilot/node.py's publish)."""
    bucket, prefix = storage.split(uri)
    result = RunResult(output_dir=Path("/home/ubuntu/ftplan-run"), artifacts=["adapter"], steps=steps,
                       total_steps=steps, first_loss=5.0, final_loss=4.0, tokens=1000, seconds=50.0,
                       tokens_per_second=20.0, peak_memory_bytes=2**30, device="cuda", gpu_name="NVIDIA A10G",
                       notes=["node 0 of 1"])
    objects = {"adapter/adapter_config.json": "{}", "adapter/adapter_model.safetensors": "weights",
               "job-summary.json": json.dumps({"result": result.model_dump(mode="json")}), "job-metrics.jsonl": "",
               "checkpoint-000002/manifest.json": "{}"}
    if checkpoint is not None:
        objects[f"checkpoint-{checkpoint:06d}/manifest.json"] = "{}"
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body.encode())


def metric(step: int, total: int = 4) -> str:
    event = {"step": step, "total_steps": total, "epoch": step / total, "loss": 5.0 - step / 4, "learning_rate": 1e-3,
             "tokens": 250 * step, "tokens_per_second": 20.0, "elapsed_seconds": 12.5 * step,
             "eta_seconds": 12.5 * (total - step), "peak_memory_bytes": 2**30}
    return "(head, rank=0, pid=4242) ftplan-metric " + json.dumps(event) + "\n"


class FakeSky:
    """SkyPilot's SDK functions as the backend calls them, recording the calls; `tail` scripts the job's log."""

    def __init__(self, sky, s3, *, tail=None, exit_code=0):
        self.sky, self.s3, self.calls, self.task = sky, s3, [], None
        self.tail = tail or (lambda stream: [stream.write(metric(s)) for s in range(1, 5)])
        self.exit_code = exit_code
        self.uri = None

    def install(self, monkeypatch) -> None:
        sky = self.sky
        for name in ("launch", "stream_and_get", "get", "tail_logs", "down", "cancel", "api_cancel"):
            monkeypatch.setattr(sky, name, getattr(self, name))
        for name in ("launch", "tail_logs", "cancel"):
            monkeypatch.setattr(sky.jobs, name, getattr(self, "jobs_" + name))
        from sky.client import sdk

        monkeypatch.setattr(sdk, "enabled_clouds", lambda **_: "rid-clouds")

    def _take(self, task_) -> None:
        self.task = task_
        self.uri = task_.storage_mounts[task.BUCKET_DIR].source

    def launch(self, task_, **kwargs):
        self.calls.append(("launch", kwargs))
        self._take(task_)
        return "rid-launch"

    def jobs_launch(self, task_, **kwargs):
        self.calls.append(("jobs.launch", kwargs))
        self._take(task_)
        return "rid-jobs-launch"

    def stream_and_get(self, request_id, output_stream=None, **_):
        output_stream.write(f"Launching {request_id}...\n")
        return {"rid-launch": (7, None), "rid-jobs-launch": ([3], None)}[request_id]

    def get(self, request_id):
        return {"rid-clouds": ["AWS"]}.get(request_id)

    def _follow(self, stream):
        self.tail(stream)
        if self.exit_code == 0:
            job_outputs(self.s3, self.uri, 4)
        return self.exit_code

    def tail_logs(self, cluster_name, job_id, follow, tail=0, output_stream=None, **_):
        self.calls.append(("tail_logs", {"cluster_name": cluster_name, "job_id": job_id}))
        return self._follow(output_stream)

    def jobs_tail_logs(self, name=None, job_id=None, follow=True, output_stream=None, **_):
        self.calls.append(("jobs.tail_logs", {"job_id": job_id}))
        return self._follow(output_stream)

    def down(self, cluster_name, **_):
        self.calls.append(("down", {"cluster_name": cluster_name}))
        return "rid-down"

    def cancel(self, cluster_name, job_ids=None, **_):
        self.calls.append(("cancel", {"cluster_name": cluster_name, "job_ids": job_ids}))
        return "rid-cancel"

    def api_cancel(self, request_ids=None, **_):
        self.calls.append(("api_cancel", {"request_ids": request_ids}))
        return "rid-api-cancel"

    def jobs_cancel(self, job_ids=None, **_):
        self.calls.append(("jobs.cancel", {"job_ids": job_ids}))
        return "rid-jobs-cancel"

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def aws(monkeypatch):
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto.mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="ftplan-test")
        plugins.reset()
        yield s3
        plugins.reset()


def start(work: Path, out: Path, plan: str = "ondemand.yaml", resume: bool = False, **options):
    request = RunRequest(data=work / "train.jsonl", output_dir=out, resume=resume, save_every=2)
    events = []
    chosen, backend, parsed = prepare(work / plan, request, backend_name=None,
                                      raw_options={"bucket": "ftplan-test", **options}, force=False)
    return execute(chosen, backend, parsed, request, events.append), events


def test_an_on_demand_plan_runs_on_a_cluster_that_is_torn_down_and_its_outputs_come_back(sky, work, tmp_path, aws,
                                                                                          monkeypatch):
    fake = FakeSky(sky, aws)
    fake.install(monkeypatch)
    summary, events = start(work, tmp_path / "out")
    assert fake.names() == ["launch", "tail_logs", "down"]
    launch = fake.calls[0][1]
    name = launch["cluster_name"]
    assert launch["idle_minutes_to_autostop"] == 30 and launch["down"] is True
    assert fake.calls[2][1] == {"cluster_name": name} and fake.calls[1][1] == {"cluster_name": name, "job_id": 7}
    assert fake.task.num_nodes == 1 and fake.uri.startswith(f"s3://ftplan-test/ftplan/{name}")
    assert [e.step for e in events] == [1, 2, 3, 4]  # the progress display saw every step once
    out = tmp_path / "out"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_model.safetensors").read_text() == "weights"
    assert not (out / "checkpoint-000002").exists()  # checkpoints stay in the bucket
    result = summary.result
    assert result.device == "cuda" and result.steps == 4 and result.final_loss == 4.0
    assert result.wall_clock_seconds is not None and result.billed_usd > 0
    plan = load(work / "ondemand.yaml")
    minimum = 60 / 3600 * plan.estimates.price.usd_per_hour  # EC2 bills at least a minute
    assert result.billed_usd == pytest.approx(max(minimum, result.wall_clock_seconds / 3600
                                                  * plan.estimates.price.usd_per_hour))
    assert any(n.startswith("billed ~$") and "wall-clock" in n for n in result.notes)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["estimated_cost_usd"] == plan.estimates.cost_usd and saved["result"]["billed_usd"] > 0
    assert yaml.safe_load((out / "task.yaml").read_text())["resources"]["instance_type"] == "g5.xlarge"
    assert json.loads((out / "skypilot.json").read_text())["job_id"] == 7
    # --resume reads the record and the bucket: the newest complete checkpoint is step 2
    backend = plugins.get_backend("skypilot")
    assert backend.checkpoint_step(RunRequest(data=work / "train.jsonl", output_dir=out),
                                   backend.parse_options({})) == 2


def test_a_spot_plan_runs_as_a_managed_job_and_a_recovery_repeats_no_step(sky, work, tmp_path, aws, monkeypatch):
    def preempted(stream):  # steps 1-3, then a recovery resumes from the checkpoint at 2 and repeats step 3
        for step in (1, 2, 3):
            stream.write(metric(step))
        stream.write("(head, rank=0, pid=1) ftplan node 0 of 1 (1 GPU(s)) ... [resuming from checkpoint 2]\n")
        for step in (3, 4):
            stream.write(metric(step))

    fake = FakeSky(sky, aws, tail=preempted)
    fake.install(monkeypatch)
    summary, events = start(work, tmp_path / "out", plan="spot.yaml")
    assert fake.names() == ["jobs.launch", "jobs.tail_logs"]  # SkyPilot's controller tears the job's cluster down
    assert fake.calls[1][1] == {"job_id": 3}
    [resources] = list(fake.task.resources)
    assert resources.use_spot
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert any("jobs controller" in n for n in summary.result.notes)


@pytest.mark.parametrize("setting", ["cancel", "ask"])  # pytest's stdin is no terminal: ask cancels
def test_ctrl_c_cancels_the_job_and_tears_the_cluster_down(sky, work, tmp_path, aws, monkeypatch, setting):
    def interrupted(stream):
        stream.write(metric(1))
        raise KeyboardInterrupt

    fake = FakeSky(sky, aws, tail=interrupted)
    fake.install(monkeypatch)
    summary, _ = start(work, tmp_path / "out", on_interrupt=setting)
    assert fake.names() == ["launch", "tail_logs", "cancel", "down"]
    assert summary.result.interrupted and summary.result.steps == 1


def test_detach_leaves_the_job_running(sky, work, tmp_path, aws, monkeypatch):
    def interrupted(stream):
        raise KeyboardInterrupt

    fake = FakeSky(sky, aws, tail=interrupted)
    fake.install(monkeypatch)
    summary, _ = start(work, tmp_path / "out", plan="spot.yaml", on_interrupt="detach")
    assert fake.names() == ["jobs.launch", "jobs.tail_logs"]
    assert any("detached" in n and "sky jobs logs 3" in n for n in summary.result.notes)


def test_detaching_from_a_cluster_leaves_it_up(sky, work, tmp_path, aws, monkeypatch):
    def interrupted(stream):
        raise KeyboardInterrupt

    fake = FakeSky(sky, aws, tail=interrupted)
    fake.install(monkeypatch)
    summary, _ = start(work, tmp_path / "out", on_interrupt="detach")
    assert fake.names() == ["launch", "tail_logs"] and summary.result.interrupted


def test_ctrl_c_while_provisioning_cancels_the_launch_request_and_the_cluster(sky, work, tmp_path, aws, monkeypatch):
    fake = FakeSky(sky, aws)
    fake.install(monkeypatch)

    def provisioning(request_id, output_stream=None, **_):
        raise KeyboardInterrupt

    monkeypatch.setattr(sky, "stream_and_get", provisioning)
    with pytest.raises(KeyboardInterrupt):  # stopped before a step: nothing to resume, so the run leaves nothing
        start(work, tmp_path / "out")
    assert fake.names() == ["launch", "api_cancel", "down"]
    assert fake.calls[1][1] == {"request_ids": "rid-launch"}
    assert not (tmp_path / "out").exists()


def test_a_failed_job_says_so_with_its_last_lines_and_the_cluster_still_goes(sky, work, tmp_path, aws, monkeypatch):
    fake = FakeSky(sky, aws, tail=lambda stream: stream.write("(head, rank=0) RuntimeError: CUDA out of memory\n"),
                   exit_code=100)
    fake.install(monkeypatch)
    with pytest.raises(PlannerError, match=r"ended without a result \(exit 100\).*CUDA out of memory"):
        start(work, tmp_path / "out")
    assert fake.names()[-1] == "down"


def test_a_failed_launch_still_tears_the_cluster_down(sky, work, tmp_path, aws, monkeypatch):
    from sky import exceptions

    fake = FakeSky(sky, aws)
    fake.install(monkeypatch)

    def unavailable(request_id, output_stream=None, **_):
        raise exceptions.ResourcesUnavailableError("Failed to provision all possible launchable resources.")

    monkeypatch.setattr(sky, "stream_and_get", unavailable)
    with pytest.raises(PlannerError, match="ResourcesUnavailableError: Failed to provision"):
        start(work, tmp_path / "out")
    assert fake.names() == ["launch", "down"]


def test_resume_relaunches_on_the_same_bucket_prefix(sky, work, tmp_path, aws, monkeypatch):
    out = tmp_path / "out"
    first = FakeSky(sky, aws, tail=lambda stream: (stream.write(metric(1)), stream.write(metric(2))), exit_code=100)
    first.install(monkeypatch)
    with pytest.raises(PlannerError):
        start(work, out)
    job_outputs(aws, first.uri, 2, checkpoint=2)
    (out / "job-summary.json").unlink(missing_ok=True)
    second = FakeSky(sky, aws, tail=lambda stream: [stream.write(metric(s)) for s in (3, 4)])
    second.install(monkeypatch)
    summary, events = start(work, out, resume=True)
    assert second.uri == first.uri and summary.result.resumed_from_step == 2
    assert [e.step for e in events] == [3, 4]


def test_check_names_what_stops_the_launch(sky, work, tmp_path, aws, monkeypatch):
    from botocore.stub import Stubber
    from sky.client import sdk

    backend = plugins.get_backend("skypilot")
    plan = load(work / "two.yaml")
    request = RunRequest(data=work / "train.jsonl", output_dir=tmp_path / "out")
    monkeypatch.setattr(sdk, "enabled_clouds", lambda **_: "rid")
    monkeypatch.setattr(sky, "get", lambda rid: ["Kubernetes"])
    quotas = boto3.client("service-quotas", region_name="us-east-1")
    stub = Stubber(quotas)
    stub.add_response("get_service_quota", {"Quota": {"Value": 4.0}},
                      {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"})
    stub.activate()
    monkeypatch.setattr(cloud, "aws_clients", lambda region: {"service-quotas": quotas, "s3": aws})
    problems = [str(p) for p in backend.check(plan, request, backend.parse_options({}))]
    assert any("AWS is not enabled for SkyPilot" in p and "sky check aws" in p for p in problems)
    assert any("vCPU quota for G and VT instances in this region is 4; 2 x g5.xlarge need 8" in p
               and "L-DB2E81BA" in p for p in problems)
    # spot plans read the spot quota; an unreadable quota is no problem
    stub.add_client_error("get_service_quota", "AccessDeniedException")
    assert cloud.quota_problem(quotas, "g5.xlarge", 2, spot=True) is None

    def no_credentials(region):
        raise PlannerError("no AWS credentials found; configure them")

    monkeypatch.setattr(cloud, "aws_clients", no_credentials)
    assert [p.message for p in backend.check(plan, request, backend.parse_options({}))] == ["no AWS credentials found"]


def test_without_skypilot_installed_check_says_how_to_install_it(work, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sky" else real(name, *a))
    backend = plugins.get_backend("skypilot")
    problems = backend.check(load(work / "ondemand.yaml"), RunRequest(data=work / "train.jsonl", output_dir=tmp_path),
                             backend.parse_options({}))
    assert [(p.message, p.fix) for p in problems] == [
        ("SkyPilot is not installed", "pip install 'ftplan[skypilot]' (SkyPilot with its AWS support)")]


def test_the_default_bucket_is_created_in_the_plans_region(aws):
    uri = storage.location(None, "eu-west-1", "run-1", "123456789012")
    assert uri == "s3://ftplan-eu-west-1-123456789012/runs/run-1"
    s3 = boto3.client("s3", region_name="eu-west-1")
    storage.ensure_bucket(s3, "ftplan-eu-west-1-123456789012", "eu-west-1")
    storage.ensure_bucket(s3, "ftplan-eu-west-1-123456789012", "eu-west-1")  # exists: nothing to do
    assert s3.get_bucket_location(Bucket="ftplan-eu-west-1-123456789012")["LocationConstraint"] == "eu-west-1"


def test_a_hostile_key_cannot_escape_the_output_directory(aws, tmp_path):
    aws.put_object(Bucket="ftplan-test", Key="runs/r/adapter/../../../escaped.txt", Body=b"x")
    with pytest.raises(PlannerError, match="outside"):
        storage.download(aws, "s3://ftplan-test/runs/r", tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
