"""The terminal: one Console for every command, and text from outside ftplan shown as data, never markup.

Everything a renderer shows that ftplan did not write itself - model names, paths, config fields, plan
values, plugin names and errors, catalog sources - goes through `clean` (no control characters, so no
escape sequence reaches the terminal) and is either escaped (`safe`, inside markup) or a Text object
(`plain`, `line`), which rich never parses as markup. Tables come from `table`: their cells wrap or fold,
never end in an ellipsis, and below NARROW columns they drop the vertical rules and edges to leave room for data.
"""

from __future__ import annotations

import re

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

NARROW = 100  # terminals below this many columns get the compact layouts (80 is the classic width)
# C0 and C1 control characters and DEL: ESC starts terminal escape sequences (titles, clearing the screen),
# BEL ends some of them. Tabs and line breaks become spaces: one field must not forge lines of output.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def make_console() -> Console:
    """A Console without repr highlighting (it re-scans every cell with regexes and costs startup time)."""
    return Console(highlight=False, emoji=False)


def clean(value: object) -> str:
    """`value` as text without control characters (each becomes a space)."""
    return _CONTROL.sub(" ", str(value))


def safe(value: object) -> str:
    """`value` cleaned and escaped, to interpolate into a markup string."""
    return escape(clean(value))


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
    the others can give way; only when they cannot does it fold too. `title` is markup only when ftplan wrote
    all of it; pass a Text otherwise."""
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
