"""The skypilot backend's per-node command, run for real: two local "nodes" (two processes with SkyPilot's
SKYPILOT_* variables set, as SkyPilot sets them on each node) train the tiny model together on the CPU through the
multi-node rendezvous, keep checkpoints and outputs in a shared folder standing in for the bucket mount, and
resume from it on fresh disks with the losses an uninterrupted run has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("peft")

from examples import tiny_model  # noqa: E402
from ftplan.backends.hf.launch import free_port  # noqa: E402
from ftplan.backends.skypilot import node, task  # noqa: E402
from tests.conftest import run_cli  # noqa: E402


def metrics(stdout: str) -> dict[int, float]:
    found = {}
    for line in stdout.splitlines():
        if line.startswith(node.METRIC_PREFIX):
            event = json.loads(line[len(node.METRIC_PREFIX):])
            found[event["step"]] = event["loss"]
    return found


def run_nodes(work: Path, bucket: Path, disks: Path, port: int) -> list[subprocess.CompletedProcess]:
    """Both nodes at once, each with its own disk, as SkyPilot runs the task's `run` on every node."""
    command = task.node_command(task.PLAN, str(work / "train.jsonl"), output="~/run", bucket_dir=str(bucket),
                                save_every=2, max_steps=4, port=port)  # ~: each node's HOME is its own disk
    procs, logs = [], []
    for rank in (0, 1):
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               "HF_HUB_OFFLINE": "1", "SKYPILOT_NODE_IPS": "127.0.0.1\n127.0.0.1", "SKYPILOT_NODE_RANK": str(rank),
               "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "0", "HOME": str(disks / f"node{rank}")}
        (disks / f"node{rank}").mkdir(parents=True, exist_ok=True)
        logs.append((disks / f"node{rank}.out", disks / f"node{rank}.err"))  # files: no pipe to fill up
        with logs[-1][0].open("w") as out, logs[-1][1].open("w") as err:
            procs.append(subprocess.Popen(["bash", "-c", command], cwd=work, env=env, stdout=out, stderr=err,
                                          start_new_session=True))
    # as SkyPilot does, a node that fails ends the job: the other is stopped rather than left waiting at the
    # rendezvous; on a failure or timeout both nodes' output is shown
    deadline = time.monotonic() + 400
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = [subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())
            for proc, (out, err) in zip(procs, logs)]
    for rank, result in enumerate(done):
        assert result.returncode == 0, (rank, [(r.returncode, r.stdout[-1500:], r.stderr[-3000:]) for r in done])
    return done


def test_two_nodes_train_through_the_rendezvous_and_resume_from_the_bucket(tmp_path):
    work = tmp_path / "work"
    tiny_model.make_model(work / "tiny")
    tiny_model.text_data(work / "train.jsonl", n=32)
    made = run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "4",
                   "--methods", "lora", "--instances", "g5.xlarge", "--max-gpus", "1", "--lr", "3e-3", "--yes",
                   "-o", "made.yaml", cwd=work)
    assert made.returncode == 0, made.stderr
    plan = yaml.safe_load((work / "made.yaml").read_text())
    assert plan["backend"] == "skypilot"
    plan["hardware"]["instance_count"] = 2  # what SkyPilot starts as num_nodes: 2
    assert plan["training"]["setup"]["batch_size"] == 4 and plan["training"]["grad_accum"] == 1
    plan["training"]["setup"]["batch_size"] = 2  # the same global batch over two instances, as plans must keep
    (work / task.PLAN).write_text(yaml.safe_dump(plan))
    bucket = tmp_path / "bucket"

    first = run_nodes(work, bucket, tmp_path / "disks-1", free_port())
    for rank, done in enumerate(first):
        assert done.returncode == 0, (rank, done.stderr[-3000:])
    assert "ftplan node 0 of 2 (0 GPU(s))" in first[0].stdout and "--here" in first[0].stdout
    assert "main_process_ip=127.0.0.1" in first[1].stdout and "machine_rank=1" in first[1].stdout
    losses = metrics(first[0].stdout)
    assert sorted(losses) == [1, 2, 3, 4] and not metrics(first[1].stdout)  # node 0 reports for the job
    summary = json.loads((bucket / "job-summary.json").read_text())["result"]
    assert summary["steps"] == 4 and any("node 0 of 2" in n for n in summary["notes"])
    assert any("2 processes (MULTI_CPU)" in n for n in summary["notes"])  # one per node, in one process group
    assert (bucket / "adapter" / "adapter_model.safetensors").exists()
    assert [p.name for p in node.checkpoints(bucket)] == ["checkpoint-000002"]
    # every process's RNG state is in the checkpoint node 0 wrote, so a node with a fresh disk can resume
    assert {p.name for p in (bucket / "checkpoint-000002").glob("rng-rank*")} == {"rng-rank0.safetensors",
                                                                                  "rng-rank1.safetensors"}

    # a managed job restarted after a preemption: new nodes, empty disks, the bucket as it was
    for name in ("adapter", "job-summary.json", "job-metrics.jsonl"):
        target = bucket / name
        if target.is_dir():
            import shutil

            shutil.rmtree(target)
        else:
            target.unlink()
    second = run_nodes(work, bucket, tmp_path / "disks-2", free_port())
    for rank, done in enumerate(second):
        assert done.returncode == 0, (rank, done.stderr[-3000:])
        assert "[resuming from checkpoint 2]" in done.stdout and "--resume" in done.stdout
    resumed = metrics(second[0].stdout)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-5), step
    assert json.loads((bucket / "job-summary.json").read_text())["result"]["resumed_from_step"] == 2


def test_skypilots_variables_become_the_rendezvous():
    assert node.rendezvous({"SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6\n", "SKYPILOT_NODE_RANK": "1",
                            "SKYPILOT_NUM_GPUS_PER_NODE": "8"}) == (1, ["10.0.0.5", "10.0.0.6"], 8)
    assert node.rendezvous({}) == (0, ["127.0.0.1"], 0)


def test_a_checkpoint_copy_cut_short_is_not_taken_for_complete(tmp_path):
    source = tmp_path / "run" / "checkpoint-000004"
    source.mkdir(parents=True)
    (source / "trainer_state.json").write_text("{}")
    (source / node.MANIFEST).write_text("{}")
    bucket = tmp_path / "bucket"
    (bucket / "checkpoint-000004").mkdir(parents=True)
    (bucket / "checkpoint-000004" / "trainer_state.json").write_text("{")  # a copy that stopped half-way
    assert node.checkpoints(bucket) == []
    node.sync_checkpoints(tmp_path / "run", bucket, set())
    assert [p.name for p in node.checkpoints(bucket)] == ["checkpoint-000004"]
    assert node.restore(bucket, tmp_path / "fresh") == 4 and (tmp_path / "fresh" / "checkpoint-000004").is_dir()


def test_node_0_does_not_copy_the_checkpoint_it_resumed_from_back_while_others_restore_it(tmp_path):
    # copying a checkpoint drops its manifest first: a node 1 restoring at that moment found no checkpoint,
    # started without --resume and left node 0 waiting at the rendezvous (the two-node test's rare hang)
    bucket, output = tmp_path / "bucket", tmp_path / "run"
    (bucket / "checkpoint-000002").mkdir(parents=True)
    (bucket / "checkpoint-000002" / "adapter.safetensors").write_text("weights")
    (bucket / "checkpoint-000002" / node.MANIFEST).write_text("{}")
    assert node.restore(bucket, output) == 2
    manifest = bucket / "checkpoint-000002" / node.MANIFEST
    os.utime(manifest, (1, 1))
    follower = node.Follower(output, bucket, main=True)
    follower.poll()
    assert manifest.stat().st_mtime == 1  # untouched
    (output / "checkpoint-000004").mkdir()
    (output / "checkpoint-000004" / node.MANIFEST).write_text("{}")
    follower.poll()
    assert [p.name for p in node.checkpoints(bucket)] == ["checkpoint-000002", "checkpoint-000004"]


def test_a_checkpoint_only_one_disk_holds_is_dropped_so_every_node_resumes_from_the_same_step(tmp_path):
    bucket, output = tmp_path / "bucket", tmp_path / "run"
    for folder, step in ((bucket, 2), (output, 2), (output, 4)):  # step 4 was written, never copied
        (folder / f"checkpoint-00000{step}").mkdir(parents=True)
        (folder / f"checkpoint-00000{step}" / node.MANIFEST).write_text("{}")
    node.forget_unshared(output, bucket)
    assert [p.name for p in node.checkpoints(output)] == ["checkpoint-000002"]
    assert node.restore(bucket, output) == 2
