"""One training process of a multi-process run (started by plugins/hf/launch.py)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .launch import ERROR_PREFIX  # launch.py does not import this module: no cycle


def _interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Train one process's share; 0 when it finished or stopped on a signal with its checkpoint saved (the
    result says which: a non-zero exit would make the launcher tear the others down mid-save), 130 when a signal
    came before training started."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # until training installs its own (stop after the step, save)
        signal.signal(sig, _interrupt)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line the launching process finds and shows, not the launcher's summary
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{ERROR_PREFIX} {type(exc).__name__ + ': ' if type(exc).__name__ != 'PlannerError' else ''}{detail}",
              file=sys.stderr, flush=True)
        if os.environ.get("FTPLAN_DEBUG"):
            raise
        return 1


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--request", type=Path, required=True)
    args = parser.parse_args(argv)
    from ftplan.api import RunRequest, load_plan

    from .backend import load_for_training
    from .launch import EVENTS, RESULT, write_new
    from .loop import train

    plan = load_plan(args.plan)
    request = RunRequest.model_validate_json(args.request.read_text())
    spec, source, tokenizer = load_for_training(plan, request)

    def record(event) -> None:  # only process 0 reports progress; the launching process follows this file
        write_new(request.output_dir / EVENTS, event.model_dump_json() + "\n", append=True)

    result = train(plan, spec, source, tokenizer, request, record)
    # each machine's first process reports to the `ftplan run` that launched it (process 0's result is the run's;
    # another node's says what that node did), so every node's run ends cleanly
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))) == 0:
        tmp = request.output_dir / (RESULT + ".tmp")
        write_new(tmp, result.model_dump_json())
        os.replace(tmp, request.output_dir / RESULT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
