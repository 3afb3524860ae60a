"""Keeping a --json command's stdout for its JSON while training libraries run and print."""

from __future__ import annotations

import contextlib
import io
import os
import sys


@contextlib.contextmanager
def stdout_kept_for_json(enabled: bool = True):
    """While the training libraries run, send what they print to stdout to stderr instead, so a command's
    --json output is the JSON object alone. DeepSpeed's logger (imported by accelerate when it is installed)
    writes a warning to stdout on first use, and native code may write to file descriptor 1 directly: both
    Python's sys.stdout and the descriptor are pointed at stderr, and what either buffered is flushed there
    before they are restored. Without a usable stdout or stderr (closed, or in memory) only Python's is moved."""
    out, err = sys.stdout, sys.stderr
    if not enabled or out is None or err is None:
        yield
        return
    fd = _descriptor(out)
    err_fd = _descriptor(err)
    out.flush()
    saved = os.dup(fd) if fd is not None and err_fd is not None else None
    try:
        if saved is not None:
            os.dup2(err_fd, fd)
        with contextlib.redirect_stdout(err):
            yield
    finally:
        _flush_everything(out)
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


def _descriptor(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # closed, or in memory
        return None


def _flush_everything(out) -> None:
    """Python's stdout (and any reference to it a library kept) and C's stdio buffers, into stderr."""
    import ctypes  # here, not at the top: every command imports this module, only --json training runs need it

    for stream in (out, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # POSIX: every C stdio stream (native code's printf)
