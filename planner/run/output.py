"""The output directory of a run: what ftplan owns there, the lock, and the manifest.

ftplan writes plan.yaml, metrics.jsonl, summary.json and `.ftplan-run.json` (the manifest: every
file a run wrote, the backend's artifacts included) into `--output`. `--force` removes exactly
what the manifest, the core and the backend's declared patterns own - never anything else - and
refuses symbolic links, so nothing outside the directory can be touched: a link among the names a run
writes is refused before any run starts, resumed or not. Two runs cannot share a directory: the first
holds an flock on `.ftplan.lock` (which names its PID), the second is refused - before --force removes
anything. The kernel drops the flock when its holder dies, so a lock file left behind blocks nothing.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from ftplan.data.files import atomic_write_text, check_writable
from ftplan.errors import PlannerError

MANIFEST = ".ftplan-run.json"
LOCK = ".ftplan.lock"
CORE_FILES = ("plan.yaml", "metrics.jsonl", "summary.json", MANIFEST)
# temporary names ftplan's atomic writes use; a crash can leave them
CORE_LEFTOVERS = (".plan.yaml.*.tmp", ".summary.json.*.tmp", ".metrics.jsonl.*.tmp", f".{MANIFEST}.*.tmp")


def read_manifest(output: Path) -> list[str]:
    """Top-level names the manifest says a previous run wrote ([] when there is none or it is damaged)."""
    if (output / MANIFEST).is_symlink():
        return []  # never read through a link: check_output_dir refuses it
    try:
        data = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
        return [n for n in data.get("files", []) if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
    except (OSError, ValueError, AttributeError):
        return []


def record(output: Path, names: list[str]) -> None:
    """Add top-level `names` to the manifest (atomically)."""
    files = sorted(set(read_manifest(output)) | {n.split("/")[0] for n in names} | {MANIFEST})
    atomic_write_text(output / MANIFEST, json.dumps({"files": files}, indent=1))


def owned(output: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Entries of `output` a run owns: core files, crash leftovers, manifest entries, backend patterns."""
    manifest = set(read_manifest(output))
    every = (*CORE_FILES, *CORE_LEFTOVERS, *patterns)
    return [p for p in output.iterdir()
            if p.name in manifest or any(fnmatch.fnmatchcase(p.name, pat) for pat in every)]


def check_output_dir(output: Path, *, resume: bool, force: bool, patterns: tuple[str, ...] = ()) -> list[Path]:
    """A new run needs an empty (or absent) directory it can write; with `force`, returns what runs own there,
    for `empty` to remove once every other check has passed. Whatever the mode: a directory another live run
    holds is refused, and so is any symbolic link among the names a run writes or reads back (nothing is ever
    written through one, so nothing lands outside)."""
    if output.is_symlink():
        raise PlannerError(f"--output {output} is a symbolic link; give a real directory")
    if output.exists() and not output.is_dir():
        raise PlannerError(f"--output {output} is a file; give a directory")
    check_writable(output, f"--output {output}")
    if not output.is_dir():
        return []
    refuse_busy(output)
    mine = owned(output, patterns)
    links = sorted(p.name for p in [*mine, output / LOCK] if _has_link(p))
    if links:
        raise PlannerError(f"{'--force: ' if force else ''}{output / links[0]} is or holds a symbolic link; ftplan "
                           "writes and removes only inside --output, never through a link - delete the link or "
                           "choose another directory")
    if resume or not any(output.iterdir()):
        return []
    if not force:
        raise PlannerError(f"--output {output} is not empty; pass --force to replace a previous run there, "
                           "--resume to continue it, or choose another directory")
    others = sorted(p.name for p in output.iterdir() if p not in mine and p.name != LOCK)
    if others:
        raise PlannerError(f"--force: {output} holds files ftplan did not write ({', '.join(others[:3])}); "
                           "choose another directory")
    return mine


def empty(output: Path, doomed: list[Path]) -> None:
    """Remove `doomed` (check_output_dir's answer under --force) from `output`, under the lock: no other run may
    start there while its predecessor's files go."""
    if not doomed:
        return
    with lock(output):
        for p in doomed:
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p)


def remove_new(output: Path, before: set[str], patterns: tuple[str, ...]) -> None:
    """Remove what a run wrote into `output` that was not there before it (`before`: the names then), so a
    run that failed before any progress leaves the directory as it found it."""
    for p in owned(output, patterns):
        if p.name in before:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def refuse_busy(output: Path) -> None:
    """PlannerError naming the PID when a live run holds `output`'s lock (checked before --force removes anything
    or --resume reads a checkpoint another run is writing)."""
    path = output / LOCK
    if path.is_symlink() or not path.exists() or _holder(path) == os.getpid():
        return  # a link is refused by check_output_dir; our own lock is no obstacle
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(output, path) from None
    finally:
        os.close(fd)


def _has_link(path: Path) -> bool:
    if path.is_symlink():
        return True
    return path.is_dir() and any(p.is_symlink() for p in path.rglob("*"))  # rglob does not follow links


def inside(output: Path, relative: str) -> Path:
    """`output / relative`, refused unless it stays inside `output` without passing a symbolic link."""
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts or not candidate.parts:
        raise PlannerError(f"'{relative}' is not a path inside the output directory")
    root = output.resolve()
    current = root
    for part in candidate.parts:
        current = current / part
        if current.is_symlink():
            raise PlannerError(f"{output / relative} passes through a symbolic link; ftplan writes only inside "
                               f"{output}")
    return current


@contextmanager
def lock(output: Path):
    """Hold `output/.ftplan.lock` for the run; PlannerError naming the holder's PID when another run has it.

    An flock, not the file's existence, is the lock: the kernel releases it when its process dies however it
    dies, so a lock file left by a killed run, or naming a PID the system has since reused, blocks nothing;
    the PID inside is only for the message."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(output, path) from None
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # its holder removed this file as we opened it: lock the one that holds the name now
    else:  # pragma: no cover - lost that race five times
        raise PlannerError(f"--output {output}: cannot take the lock {path}")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes, so no one can lock a file about to be unlinked
        os.close(fd)


def _busy(output: Path, path: Path) -> PlannerError:
    holder = None
    for _ in range(20):  # the holder writes its PID just after taking the lock
        if (holder := _holder(path)) is not None:
            break
        time.sleep(0.05)
    return PlannerError(f"--output {output} is in use by another ftplan run (PID {holder or 'unknown'}); wait for "
                        "it or choose another directory")


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
