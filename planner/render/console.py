"""The terminal: one Console for every command, and text from outside ftplan shown as data, never markup."""

from __future__ import annotations

from rich.console import Console


def make_console() -> Console:
    """A Console without repr highlighting (it re-scans every cell with regexes and costs startup time)."""
    return Console(highlight=False, emoji=False)
