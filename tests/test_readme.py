"""The README's loop (estimate -> recommend -> accept -> run on a tiny local model) works as shown."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def loop_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- loop-start -->\s*```\n(.*?)```\s*<!-- loop-end -->", text, re.S).group(1)
    return [shlex.split(line) for line in block.strip().splitlines()]


def test_the_readme_loop_runs_as_written(tmp_path):
    pytest.importorskip("torch")
    import subprocess

    commands = loop_commands()
    assert [c[0] for c in commands] == ["python", "ftplan", "ftplan", "ftplan", "ftplan"]
    for command in commands:
        if command[0] == "python":
            result = subprocess.run([sys.executable, str(ROOT / command[1]), *command[2:]], cwd=tmp_path,
                                    capture_output=True, text=True)
        else:
            result = run_cli(*command[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
    assert (tmp_path / "demo" / "out" / "summary.json").exists()


# (the README's words, the estimate behind them): every memory figure the README quotes from `ftplan estimate`,
# full fine-tuning, one estimate per figure (its options; sync_each_batch is --sync-each-batch)
FSDP8 = {"gpus": 8, "sharding": "fsdp", "grad_accum": 4}
README_FIGURES = [
    ("peak 102.8 -> 127.9 GiB", "llama2-7b", ("memory", "peak_allocated_bytes"), [{}, {"grad_accum": 2}]),
    ("needs 37.9 GiB per GPU as the Trainer\nruns it, 28.2 GiB with it", "llama2-7b", ("sharded", "required_bytes"),
     [FSDP8, {**FSDP8, "sync_each_batch": True}]),
    ("needs 125.2 GiB per GPU", "llama2-70b", ("sharded", "required_bytes"),
     [{"gpus": 16, "nodes": 2, "sharding": "fsdp"}]),
]


@pytest.mark.parametrize("words, model, field, estimates", README_FIGURES, ids=lambda v: str(v)[:20])
def test_the_readmes_memory_figures_are_what_estimate_gives(words, model, field, estimates):
    from ftplan.estimate.report import estimate
    from ftplan.estimate.settings import SetupChoices
    from ftplan.model.resolve import resolve_model

    assert words in (ROOT / "README.md").read_text()
    figures = []
    for options in estimates:
        options = dict(options)
        choices = SetupChoices(sync_each_batch=options.pop("sync_each_batch", False))
        e = estimate(resolve_model(model), ["full"], choices, **options).estimates[0]
        figures.append(f"{getattr(getattr(e, field[0]), field[1]) / 2**30:.1f}")
    assert re.findall(r"\d+\.\d", words) == figures
