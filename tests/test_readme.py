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
