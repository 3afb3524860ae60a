"""The terminal: one Console for every command, and text from outside ftplan shown as data, never markup.

Plans, configs, datasets, paths, prices and plugins all supply text that ends up on screen. Rather than
escaping it at each of the many places it is interpolated (one place forgotten is one hole), the console
itself parses no markup at all - ftplan styles its own words with `line` and `style=` - and strips control
characters from every piece of text it writes, leaving only the escape sequences rich itself generates.
Tables come from `table`: their cells wrap or fold, never end in an ellipsis, and below NARROW columns they
drop the vertical rules and edges to leave room for data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich import box
from rich.console import Console
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from ftplan.errors import printable

NARROW = 100  # terminals below this many columns get the compact layouts (80 is the classic width)
_BREAKS = re.compile(r"[\t\n\r\v\f\x85\u2028\u2029]")


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


def clean(value: object) -> str:
    """`value` as one line of text: line breaks and tabs become spaces (one field must not forge lines of
    output), other control characters go (as the console itself drops them)."""
    return printable(_BREAKS.sub(" ", str(value)))


def plain(value: object, style: str = "") -> Text:
    """`value` cleaned, as a Text that rich shows literally."""
    return Text(clean(value), style=style)


def lines(*texts: object, style: str = "") -> Text:
    """Several values, each cleaned, one a line."""
    return Text("\n".join(clean(t) for t in texts), style=style)


def line(*parts: str | tuple[str, str], style: str = "") -> Text:
    """A line assembled from literal parts: strings, or (string, style) pairs; all cleaned, none parsed."""
    return Text.assemble(*((clean(p[0]), p[1]) if isinstance(p, tuple) else clean(p) for p in parts), style=style)


def is_narrow(console_or_width: Console | int) -> bool:
    """Whether a terminal (or a width) gets the compact layouts."""
    width = console_or_width if isinstance(console_or_width, int) else console_or_width.width
    return width < NARROW


def table(title: str | Text | None = None, *columns: str | tuple, width: int = 120, **options) -> Table:
    """A table whose cells wrap at spaces and fold long words rather than being cut. `columns` are headers, or
    (header, justify) or (header, justify, keep) tuples: a kept column (names, numbers) is not wrapped while
    the others can give way; only when they cannot does it fold too. Nothing in it is parsed as markup."""
    if width < NARROW:  # rules under the header only, one space between columns: room for the data
        for key, value in (("box", box.SIMPLE_HEAD), ("show_edge", False), ("pad_edge", False),
                           ("collapse_padding", True)):
            options.setdefault(key, value)
    else:
        options.setdefault("box", box.HEAVY_HEAD)
    made = Table(title=title, title_justify="left", **options)
    for column in columns:
        header, justify, keep = (*column, False)[:3] if isinstance(column, tuple) else (column, "left", False)
        made.add_column(header, justify=justify, overflow="fold", no_wrap=keep)
    return made
