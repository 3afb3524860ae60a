"""Runs inside the SageMaker training container: ftplan's own Hugging Face backend on the plan.

SageMaker puts the channels under /opt/ml/input/data/<channel>, syncs /opt/ml/checkpoints with
S3 (so a spot interruption resumes from there) and uploads /opt/ml/model when the job ends.
Progress goes to the log as `ftplan-metric {json}` lines, which `ftplan run` follows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

INPUT = Path("/opt/ml/input/data")
CHECKPOINTS = Path("/opt/ml/checkpoints")
MODEL = Path("/opt/ml/model")
RUN_DIR_NAME = "run"
# what the job hands back (the tokenizer sits inside adapter/ or model/); the job's own summary and metrics
# travel under other names, since ftplan writes summary.json and metrics.jsonl of the run that followed the job
COPIED = {"adapter": "adapter", "model": "model", "summary.json": "job-summary.json",
          "metrics.jsonl": "job-metrics.jsonl"}


def data_file(channel: Path) -> Path:
    """The training data inside a channel: a saved dataset directory, or its single JSONL file."""
    from ftplan.api import is_saved_dataset  # importable: main() put the source dir on sys.path

    if is_saved_dataset(channel):
        return channel
    files = sorted(channel.glob("*.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"ftplan: expected one .jsonl file in {channel}, found {len(files)}")
    return files[0]


def resuming(run_dir: Path) -> bool:
    """A restarted (e.g. interrupted spot) job finds the synced checkpoints and continues from them."""
    return run_dir.is_dir() and any(p.name.startswith("checkpoint-") for p in run_dir.iterdir())


def main(input_dir: Path = INPUT, checkpoints: Path = CHECKPOINTS, model_dir: Path = MODEL) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # ftplan's packages travel in the source dir
    from ftplan.api import RunRequest
    from ftplan.api import execute_run as execute
    from ftplan.api import prepare_run as prepare

    run_dir = checkpoints / RUN_DIR_NAME
    model_channel = input_dir / "model"
    request = RunRequest(data=data_file(input_dir / "train"), output_dir=run_dir,
                         model_path=str(model_channel) if model_channel.exists() else None,
                         resume=resuming(run_dir), save_every=int(os.environ.get("FTPLAN_SAVE_EVERY", "50")),
                         here=True)  # the job's instance is the plan's hardware: no refusal over the instance count
    plan, backend, options = prepare(input_dir / "plan" / "plan.yaml", request, backend_name="hf", raw_options={},
                                     force=False)
    summary = execute(plan, backend, options, request,
                      lambda event: print("ftplan-metric " + event.model_dump_json(), flush=True))
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, copied in COPIED.items():
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, model_dir / copied, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, model_dir / copied)
    print("ftplan-summary " + json.dumps({"steps": summary.result.steps, "final_loss": summary.result.final_loss}))
    return 130 if summary.result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
