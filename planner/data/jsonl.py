"""JSONL training data read safely: one line at a time, in memory that does not grow with the file.

Only regular files are read (a FIFO would hang, /dev/zero would never end); lines are split on
"\\n" alone, so a raw U+2028 or U+0085 inside a JSON string stays part of its line; a line longer
than MAX_LINE_BYTES is refused before it is held whole; and whatever the line holds - a lone
surrogate, a 5000-digit number, 100,000 nested brackets, an empty text - becomes one PlannerError
naming the file, the line and the fix.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Literal

from ftplan.errors import PlannerError

MAX_LINE_BYTES = 16 * 1024 * 1024  # a longer "example" is a broken file, not training data
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise PlannerError(f"dataset {path} is a directory; pass a .jsonl file")
    if not stat.S_ISREG(mode):
        raise PlannerError(f"dataset {path} is {_kind(mode)}, not a regular file; save the data to a .jsonl file "
                           "and pass that")


@contextmanager
def open_dataset(path: Path) -> Iterator[BinaryIO]:
    """`path` opened for binary reading; PlannerError unless it is a regular file (FIFOs, devices and
    sockets are refused without blocking: the open is non-blocking and checked before any read)."""
    try:  # stat first: a socket cannot even be opened; then fstat what was opened (it may have been swapped)
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PlannerError(f"dataset {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise PlannerError(f"dataset {path} is a directory; pass a .jsonl file") from None
    except OSError as exc:
        raise PlannerError(f"cannot read dataset {path}: {exc.strerror}") from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_line(handle: BinaryIO, where: str) -> bytes:
    """The next line (with its "\\n"), b"" at the end; PlannerError naming `where` when it exceeds
    MAX_LINE_BYTES (it is never held whole)."""
    line = handle.readline(MAX_LINE_BYTES + 1)
    if len(line) > MAX_LINE_BYTES:
        raise PlannerError(f"{where}: longer than {MAX_LINE_BYTES // 2**20} MiB; one line must hold one example - "
                           "split it or check that the file is JSONL")
    return line


def iter_lines(handle: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every line, split on b"\\n" only."""
    number = 0
    while True:
        number += 1
        line = read_line(handle, f"dataset {path}, line {number}")
        if not line:
            return
        yield number, line


RecordKind = Literal["text", "pair", "chat"]


def record_kind(record: dict) -> RecordKind | None:
    """A record's format, as everything that reads examples decides it: a string `text`, else string `prompt`
    and `completion` (a pair), else a non-empty `messages` list (chat); None when it is none of them."""
    if isinstance(record.get("text"), str):
        return "text"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "pair"
    if isinstance(record.get("messages"), list) and record["messages"]:
        return "chat"
    return None


def example_text(record: object, where: str) -> str:
    """The text an example trains on: `text`, `prompt` + `completion`, or the `messages` contents."""
    if not isinstance(record, dict):
        raise PlannerError(f"{where}: expected a JSON object with 'text', 'prompt'/'completion' or 'messages', "
                           f"got {type(record).__name__}")
    kind = record_kind(record)
    if kind == "text":
        return record["text"]
    if kind == "pair":
        return record["prompt"] + record["completion"]
    if kind == "chat":
        parts = []
        for i, m in enumerate(record["messages"]):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise PlannerError(f"{where}: messages[{i}] needs string 'role' and 'content'")
            parts.append(f"{m['role']}: {m['content']}\n")
        return "".join(parts)
    raise PlannerError(f"{where}: no 'text', 'prompt'+'completion' or 'messages' field (keys: "
                       f"{', '.join(sorted(map(str, record))) or 'none'}); use one of those formats")


def example_parts(record: dict, text: str) -> tuple[str, ...]:
    """What a trainer tokenizes separately: (prompt, completion) for a pair - the hf backend encodes the
    completion on its own, without special tokens - else the one example text."""
    if record_kind(record) == "pair":
        return record["prompt"], record["completion"]
    return (text,)


def _loads(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise PlannerError(f"{where}: invalid JSON (nested too deeply); flatten the record") from None
    except ValueError as exc:  # Python's limit on the digits of an integer (int_max_str_digits)
        detail = "a number with too many digits" if "digits" in str(exc) else str(exc).split(";")[0]
        raise PlannerError(f"{where}: invalid JSON ({detail}); write long numbers as strings") from None


def parse_line(line: bytes, where: str) -> tuple[dict, str] | None:
    """The record of one raw line and its example text, None for a blank line; PlannerError naming `where`
    for anything that is not a usable example."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise PlannerError(f"{where}: not UTF-8 text; re-encode the file as UTF-8") from None
    if not text.strip():
        return None
    record = _loads(text, where)
    example = example_text(record, where)
    if not example.strip():
        raise PlannerError(f"{where}: the example's text is empty or only whitespace; remove the line or give "
                           "it text")
    try:
        if b"\\ud" in line or b"\\uD" in line:  # only an escape can make a surrogate; skip the check otherwise
            example.encode("utf-8")
    except UnicodeEncodeError as exc:  # "\ud800" in JSON decodes to a lone surrogate, which no tokenizer takes
        raise PlannerError(f"{where}: the text holds a lone surrogate (\\u{ord(exc.object[exc.start]):04x}), "
                           "which is not a character; fix the escape") from None
    return record, example


def iter_records(path: Path) -> Iterator[tuple[int, dict, str]]:
    """(line number, record, example text) for every non-blank line of a JSONL file, validated as it is
    read; memory does not grow with the file."""
    with open_dataset(path) as handle:
        for number, line in iter_lines(handle, path):
            parsed = parse_line(line, f"dataset {path}, line {number}")
            if parsed is not None:
                yield number, parsed[0], parsed[1]


def record_at(handle: BinaryIO, path: Path, offset: int) -> dict:
    """The record of the line starting at byte `offset` (an offset `iter_offsets` reported); PlannerError
    saying the file changed when no record starts there any more."""
    changed = (f"dataset {path} changed while it was read (no record starts at byte {offset} any more); do not "
               "edit the data during a run")
    if offset:
        handle.seek(offset - 1)
        if handle.read(1) != b"\n":
            raise PlannerError(changed)
    handle.seek(offset)
    where = f"dataset {path}, the line at byte {offset}"
    try:
        parsed = parse_line(read_line(handle, where), where)
    except PlannerError as exc:
        raise PlannerError(f"{changed} ({exc})") from None
    if parsed is None:
        raise PlannerError(changed)
    return parsed[0]


def iter_offsets(path: Path) -> Iterator[tuple[int, int, dict, str]]:
    """(line number, byte offset, record, example text) for every non-blank line."""
    with open_dataset(path) as handle:
        offset = 0
        for number, line in iter_lines(handle, path):
            parsed = parse_line(line, f"dataset {path}, line {number}")
            if parsed is not None:
                yield number, offset, parsed[0], parsed[1]
            offset += len(line)
