"""Shared fixtures: CLI runner helpers and tiny configs written to temporary files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_module(name: str):
    """A script of benchmarks/ (not a package) imported once as a module, its folder on sys.path for its own
    imports of the others."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, input: str | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `ftplan` as a user would: a fresh process, its real exit code and streams."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftplan", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd, input=input if input is not None else "")


def run_cli_tty(*args: str, answer: str, cwd: Path | None = None, timeout: int = 300) -> tuple[int, str]:
    """Run `ftplan` with a terminal on stdin (a pseudo-terminal), type `answer`, return (exit code, output)."""
    import pty

    main, child = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "ftplan", *args], stdin=child, stdout=child, stderr=child,
                            cwd=cwd, env=env, close_fds=True)
    os.close(child)
    os.write(main, answer.encode())
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    code = proc.wait(timeout=timeout)
    os.close(main)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.fixture(autouse=True)
def private_ftplan_home(tmp_path_factory, monkeypatch):
    """Calibration and caches go to a fresh directory, never the user's ~/.config/ftplan."""
    monkeypatch.setenv("FTPLAN_HOME", str(tmp_path_factory.mktemp("ftplan-home")))


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config dict as config.json in a fresh directory and return the directory."""
    def write(config: dict | str, name: str = "model") -> Path:
        directory = tmp_path / name
        directory.mkdir()
        text = config if isinstance(config, str) else json.dumps(config)
        (directory / "config.json").write_text(text)
        return directory
    return write


TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
