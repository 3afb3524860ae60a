"""Interruption and concurrency, through real processes: SIGTERM to a two-process run stops every process
with one checkpoint and exit 130, and its resume matches an uninterrupted two-process run; a second run on
an output in use is refused (plain, --force and --resume) without touching the first's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from examples import tiny_model  # noqa: E402
from ftplan.run import registry  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.test_bad_input import call  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    tiny_model.make_model(root / "tiny")
    tiny_model.text_data(root / "train.jsonl", n=32)
    for name, epochs in (("ddp.yaml", "3"), ("long.yaml", "40")):
        made = run_cli("recommend", "./tiny", "--dataset", "train.jsonl", "--seq-len", "32", "--global-batch", "4",
                       "--batch-size", "1", "--methods", "lora", "--max-gpus", "1", "--instances", "g5.xlarge",
                       "--lr", "3e-3", "--epochs", epochs, "--backend", "hf", "--yes", "-o", name, cwd=root)
        assert made.returncode == 0, made.stderr
    return root


def start(ws: Path, plan: str, out: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "ftplan", "run", plan, "--data", "train.jsonl", "--output", out,
                             "--json", *extra], cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_lines(path: Path, lines: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail(f"{path} did not reach {lines} lines")


def processes_using(out: Path) -> list[int]:
    """PIDs whose command line names `out` (the launcher and the workers get --plan OUT/plan.yaml)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(out) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds leftover processes through /proc")
def test_sigterm_stops_every_process_of_a_two_process_run_and_resume_matches(ws):
    reference = run_cli("run", "ddp.yaml", "--data", "train.jsonl", "--output", "ref", "--option", "processes=2",
                        "--json", cwd=ws)
    assert reference.returncode == 0, reference.stderr
    out = ws / "cut"
    proc = start(ws, "ddp.yaml", "cut", "--option", "processes=2", "--save-every", "1000")
    wait_for_lines(out / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 130, proc.stderr.read()
    assert "--resume" in proc.stderr.read()
    deadline = time.time() + 20
    while processes_using(out.resolve()) and time.time() < deadline:  # exited, so nothing should be left
        time.sleep(0.2)
    assert processes_using(out.resolve()) == [], "a launcher or worker outlived ftplan"
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(saved) == 1 and not list(out.glob(".checkpoint-*")), saved  # one checkpoint, saved together
    summary = json.loads(proc.stdout.read())
    assert summary["result"]["interrupted"] and summary["result"]["steps"] == int(saved[0].split("-")[1])
    resumed = run_cli("run", "ddp.yaml", "--data", "train.jsonl", "--output", "cut", "--option", "processes=2",
                      "--resume", "--json", cwd=ws)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = losses(ws / "ref"), losses(out)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


def test_a_second_run_on_an_output_in_use_is_refused_and_touches_nothing(ws, capsys):
    out = ws / "busy"
    first = start(ws, "long.yaml", "busy")
    try:
        wait_for_lines(out / "metrics.jsonl", 2, first)
        cwd = os.getcwd()
        os.chdir(ws)
        try:
            for extra in ([], ["--force"], ["--resume"]):
                before = {p.name for p in out.iterdir()}
                registry.reset()
                code = call(["run", "long.yaml", "--data", "train.jsonl", "--output", "busy", *extra])
                err = capsys.readouterr().err
                assert code == 2, err
                assert f"--output busy is in use by another ftplan run (PID {first.pid})" in err, err
                assert {"plan.yaml", "metrics.jsonl"} <= before <= {p.name for p in out.iterdir()}
        finally:
            os.chdir(cwd)
        assert first.poll() is None  # the first run went on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 130, first.stderr.read()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_workers_of_a_launcher_that_dies_are_killed_not_orphaned(tmp_path):
    """torchrun's workers lead sessions of their own; a launcher killed from outside leaves them to init, still
    training. The supervisor must remember them while the launcher lives and kill them when it is gone."""
    from ftplan.backends.hf.launch import _start, _supervise

    pid_file = tmp_path / "worker.pid"
    worker = "import time; time.sleep(120)"
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {worker!r}], "
                f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(3)")
    proc, _ = _start([sys.executable, "-c", launcher])
    assert _supervise(proc, tmp_path / "events.jsonl", lambda event: None) is False
    assert gone(int(pid_file.read_text())), "the worker outlived its launcher and ftplan"


def test_the_lock_is_the_kernels_not_the_files(tmp_path):
    """A lock taken by another process that has not yet written its PID is still a lock (it used to be removed
    as stale); a lock file left by a killed run, naming a PID that now belongs to some live process, is not."""
    from ftplan.errors import PlannerError
    from ftplan.run import output

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(60)", str(out / output.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: output.refuse_busy(out), lambda: output.lock(out).__enter__()):
            with pytest.raises(PlannerError, match="is in use by another ftplan run"):
                attempt()
        assert (out / output.LOCK).exists()
    finally:
        holder.kill()
        holder.wait()
    (out / output.LOCK).write_text(str(os.getppid()))  # a live PID, but no lock held: a killed run's leftover
    output.refuse_busy(out)
    with output.lock(out):
        assert (out / output.LOCK).read_text() == str(os.getpid())
    assert not (out / output.LOCK).exists()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc")
def test_a_second_interrupt_kills_the_launcher_and_its_workers(tmp_path, monkeypatch):
    """The first Ctrl-C asks the launcher to stop (it waits for its workers to save); the second must not wait."""
    from ftplan.backends.hf import launch

    pid_file = tmp_path / "worker.pid"
    worker = "import time; time.sleep(120)"
    launcher = (f"import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
                f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    proc, _ = launch._start([sys.executable, "-c", launcher])
    deadline = time.time() + 30
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)  # the supervisor scans for workers once a second
    presses = iter([False, False, True, True])  # two quiet reads, then Ctrl-C, then Ctrl-C again

    def read(self):
        if next(presses, False):
            raise KeyboardInterrupt

    monkeypatch.setattr(launch._Follower, "read", read)
    started = time.time()
    assert launch._supervise(proc, tmp_path / "events.jsonl", lambda event: None) is True
    assert time.time() - started < 30 and proc.returncode is not None
    assert gone(int(pid_file.read_text())), "the worker outlived a second Ctrl-C"


def gone(pid: int, timeout: float = 10) -> bool:
    """Whether `pid` has ended (or is a zombie) within `timeout`: SIGKILL takes effect when the process next runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False
