"""The RSS instrument's child process (started by instruments.rss_in_child with glibc set for measuring):
reads {spec, setup, seed, micro_steps} as JSON on stdin, builds and warms up the same model, and prints the
resident tensor bytes and the peak RSS of one step above the resident set before it."""

from __future__ import annotations

import json
import sys


def main() -> int:
    from ftplan.estimate.settings import TrainingSetup
    from ftplan.measure.instruments import rss_extra
    from ftplan.measure.session import nbytes, prepare
    from ftplan.model.spec import spec_from_config

    request = json.loads(sys.stdin.read())
    spec = spec_from_config(request["config"], name=request["name"], source="measure")
    session = prepare(spec, TrainingSetup.model_validate(request["setup"]), "cpu", request.get("seed", 0),
                      request.get("micro_steps", 1))
    resident = nbytes(session.resident_tensors())
    extra = rss_extra(session.step)
    print(json.dumps({"resident_bytes": resident, "extra_bytes": extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
