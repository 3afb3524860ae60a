"""Runs on every node SkyPilot started: `ftplan run --backend hf --here` on the plan, wired into the multi-node
rendezvous from SkyPilot's variables, with the run's directory kept in step with a bucket.

- SKYPILOT_NODE_IPS (newline-separated, head first), SKYPILOT_NODE_RANK and SKYPILOT_NUM_GPUS_PER_NODE become the
  hf backend's machines, machine_rank, main_process_ip and processes options;
- the run's directory is on the node's own disk; the newest checkpoint in the bucket is restored into it first
  (a managed job restarted after a preemption, or `ftplan run --resume`), and the run then resumes from it;
- node 0 prints each progress event as an `ftplan-metric {json}` line (which `ftplan run --backend skypilot`
  follows in the job's log), copies every new checkpoint to the bucket (manifest last, so a half-copied one is
  never taken for complete), and at the end copies the adapter or model, summary and metrics there;
- SIGTERM or SIGINT is passed on, so the run saves a checkpoint, which is copied before the node exits.

Standard library only until `ftplan run` starts: this module also runs under tests as two local "nodes".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MANIFEST = "manifest.json"  # the hf backend's checkpoint manifest, written last
KEEP = 2                    # checkpoints kept in the bucket, as the hf backend keeps locally
METRIC_PREFIX = "ftplan-metric "
# what the bucket receives at the end, under names that do not collide with the summary and metrics
# `ftplan run --backend skypilot` writes for the run it followed
FINAL = {"adapter": "adapter", "model": "model", "summary.json": "job-summary.json",
         "metrics.jsonl": "job-metrics.jsonl"}


def rendezvous(env: dict[str, str]) -> tuple[int, list[str], int]:
    """(this node's rank, every node's address with the head first, GPUs per node) from SkyPilot's variables."""
    ips = [ip.strip() for ip in env.get("SKYPILOT_NODE_IPS", "").splitlines() if ip.strip()] or ["127.0.0.1"]
    return int(env.get("SKYPILOT_NODE_RANK", "0") or 0), ips, int(env.get("SKYPILOT_NUM_GPUS_PER_NODE", "0") or 0)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (manifest present) in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CHECKPOINT.match(p.name) and (p / MANIFEST).is_file()),
                  key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def copy_checkpoint(source: Path, target_dir: Path) -> None:
    """Copy a checkpoint file by file, the manifest last: a copy cut short has no manifest and is not complete.
    (Bucket mounts do not rename directories, so the hf backend's write-then-rename cannot be used there.)"""
    target = target_dir / source.name
    target.mkdir(parents=True, exist_ok=True)
    (target / MANIFEST).unlink(missing_ok=True)
    for path in sorted(source.iterdir()):
        if path.name != MANIFEST and path.is_file():
            shutil.copyfile(path, target / path.name)
    shutil.copyfile(source / MANIFEST, target / MANIFEST)


def restore(bucket: Path | None, output: Path) -> int | None:
    """Copy the bucket's newest checkpoint into the run directory; its step, or None when there is none."""
    found = checkpoints(bucket) if bucket else []
    if not found:
        return None
    newest = found[-1]
    output.mkdir(parents=True, exist_ok=True)
    if not (output / newest.name / MANIFEST).is_file():
        copy_checkpoint(newest, output)
    return int(CHECKPOINT.match(newest.name).group(1))


def forget_unshared(output: Path, bucket: Path) -> None:
    """Drop this disk's checkpoints that the bucket does not hold (written before a node was stopped, not yet
    copied): every node must resume from the same step, and only the bucket is the same for all of them."""
    shared = {p.name for p in checkpoints(bucket)}
    for path in output.iterdir() if output.is_dir() else []:
        if CHECKPOINT.match(path.name) and path.name not in shared:
            shutil.rmtree(path, ignore_errors=True)


def sync_checkpoints(output: Path, bucket: Path, copied: set[str]) -> None:
    """Copy the run's new complete checkpoints to the bucket and drop the bucket's older ones."""
    for path in checkpoints(output):
        if path.name not in copied:
            copy_checkpoint(path, bucket)
            copied.add(path.name)
    for old in checkpoints(bucket)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def publish(output: Path, bucket: Path) -> list[str]:
    """The run's final outputs into the bucket (node 0, at the end)."""
    done = []
    for name, target in FINAL.items():
        source = output / name
        if source.is_dir():
            shutil.copytree(source, bucket / target, dirs_exist_ok=True)
            done.append(target)
        elif source.is_file():
            shutil.copyfile(source, bucket / target)
            done.append(target)
    return done


def run_command(args: argparse.Namespace, rank: int, ips: list[str], gpus: int, resume: bool) -> list[str]:
    """`ftplan run` with the hf backend on this node (`--here`: the node is the plan's hardware, one of its
    instances)."""
    cmd = [sys.executable, "-m", "ftplan", "run", str(args.plan), "--backend", "hf", "--here", "--data",
           str(args.data), "--output", str(args.output), "--save-every", str(args.save_every), "--json",
           "--option", f"processes={max(1, gpus)}"]
    if len(ips) > 1:
        cmd += ["--option", f"machines={len(ips)}", "--option", f"machine_rank={rank}", "--option",
                f"main_process_ip={ips[0]}", "--option", f"main_process_port={args.port}"]
    for flag, value in (("--eval-data", args.eval_data), ("--model-path", args.model_path),
                        ("--max-steps", args.max_steps)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if resume:
        cmd.append("--resume")
    return cmd


class Follower:
    """Node 0's view of the run directory: new progress lines become `ftplan-metric` lines, new checkpoints go
    to the bucket."""

    def __init__(self, output: Path, bucket: Path | None, main: bool) -> None:
        self.output, self.bucket, self.main = output, bucket, main
        self.lines_seen = 0
        # what the bucket already holds (the checkpoint this run resumed from) is not copied back: copying
        # removes its manifest first, and another node still restoring from it would find no checkpoint
        self.copied: set[str] = {p.name for p in checkpoints(bucket)} if bucket is not None else set()

    def poll(self) -> None:
        if not self.main:
            return
        metrics = self.output / "metrics.jsonl"
        if metrics.is_file():
            lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
            for line in lines[self.lines_seen:]:
                if not line.endswith("}"):
                    break  # being written; read it next time
                print(METRIC_PREFIX + line, flush=True)
                self.lines_seen += 1
        if self.bucket is not None:
            sync_checkpoints(self.output, self.bucket, self.copied)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ftplan.backends.skypilot.node", description=__doc__.split("\n")[0])
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--model-path")
    parser.add_argument("--output", type=Path, required=True, help="the run directory on this node's disk")
    parser.add_argument("--bucket-dir", type=Path, help="the bucket's mount: checkpoints and final outputs")
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--port", type=int, default=29500, help="node 0's rendezvous port")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    args.output = args.output.expanduser()
    rank, ips, gpus = rendezvous(dict(os.environ))
    bucket = args.bucket_dir.expanduser() if args.bucket_dir else None
    if bucket is not None:
        bucket.mkdir(parents=True, exist_ok=True)
    if args.output.exists() and not checkpoints(args.output):
        shutil.rmtree(args.output)  # a scratch directory of an earlier attempt on this disk, with nothing to keep
    if bucket is not None:
        forget_unshared(args.output, bucket)
    step = restore(bucket, args.output)
    resume = step is not None or bool(checkpoints(args.output))
    cmd = run_command(args, rank, ips, gpus, resume)
    print(f"ftplan node {rank} of {len(ips)} ({gpus} GPU(s)): " + " ".join(cmd)
          + (f" [resuming from checkpoint {step}]" if step is not None else ""), flush=True)
    follower = Follower(args.output, bucket, main=rank == 0)
    child = subprocess.Popen(cmd)

    def pass_on(signum, frame):  # noqa: ARG001 - the run saves a checkpoint, which the loop below copies
        child.send_signal(signal.SIGINT)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, pass_on)
    while child.poll() is None:
        follower.poll()
        time.sleep(args.poll_seconds)
    follower.poll()
    if rank == 0 and bucket is not None:
        published = publish(args.output, bucket)
        print("ftplan-node-done " + json.dumps({"exit": child.returncode, "published": published}), flush=True)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
