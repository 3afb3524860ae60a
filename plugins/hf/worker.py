"""One training process of a multi-process run (started by plugins/hf/launch.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--request", type=Path, required=True)
    args = parser.parse_args(argv)
    from ftplan.api import RunRequest, load_plan

    from .backend import load_for_training
    from .launch import EVENTS, RESULT
    from .loop import train

    plan = load_plan(args.plan)
    request = RunRequest.model_validate_json(args.request.read_text())
    spec, source, tokenizer = load_for_training(plan, request)

    def record(event) -> None:  # only process 0 reports progress; the launching process follows this file
        with open(request.output_dir / EVENTS, "a", encoding="utf-8") as f:
            f.write(event.model_dump_json() + "\n")

    result = train(plan, spec, source, tokenizer, request, record)
    # each machine's first process reports to the `ftplan run` that launched it (process 0's result is the run's;
    # another node's says what that node did), so every node's run ends cleanly
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        tmp = request.output_dir / (RESULT + ".tmp")
        tmp.write_text(result.model_dump_json())
        os.replace(tmp, request.output_dir / RESULT)
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
