"""The terminal: one Console for every command, and text from outside ftplan shown as data, never markup.

Plans, configs, datasets, paths, prices and plugins all supply text that ends up on screen. Rather than
escaping it at each of the many places it is interpolated (one place forgotten is one hole), the console
itself parses no markup at all - ftplan styles its own words with Text and `style=` - and strips control
characters from every piece of text it writes, leaving only the escape sequences rich itself generates.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.console import Console
from rich.segment import Segment
from rich.text import Text

from ftplan.errors import printable


class _DataConsole(Console):
    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # the last point where text and rich's own control output are still apart (Segment.control)
        return super()._render_buffer(s if s.control else Segment(printable(s.text), s.style, s.control)
                                      for s in buffer)


def make_console(**options) -> Console:
    """A Console that treats every string as plain text (no markup, emoji or repr highlighting - highlighting also
    re-scans every cell with regexes and costs startup time) and never writes a control character it did not
    generate. `options` go to rich's Console (tests give a file and force a terminal)."""
    return _DataConsole(highlight=False, emoji=False, markup=False, **options)


def styled(*parts: str | tuple[str, str]) -> Text:
    """A line from plain strings and (text, style) pairs - how ftplan styles its own words without markup."""
    return Text.assemble(*parts)
