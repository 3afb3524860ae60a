"""Rich rendering for `ftplan prices`: the refresh report and every price with its origin.

Sources are long sentences shared by many prices: the table numbers them and lists each once under it, so
a price takes one line even on an 80-column terminal. Prices may come from a user's cache file or a plugin:
every value is shown as data."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftplan.render.console import line, plain, table


def print_refresh(report, console: Console) -> None:
    """What a refresh updated, what it found no product for, and the rows it skipped."""
    console.print(line(f"Refreshed {len(report.updated)} price(s)" + (f" into {report.path}" if report.path else "")))
    for p in report.updated:
        console.print(line(f"  {p.instance_type:<20} {p.region:<14} {p.platform:<9} {p.market:<9} "
                           f"${p.usd_per_hour:,.4f}/h"))
    if report.missing:
        console.print(line(f"No product for {len(report.missing)}: {', '.join(report.missing[:8])}"
                           + (" ..." if len(report.missing) > 8 else "") + " (the bundled price, if any, stays)",
                           style="dim"))
    for e in report.errors:
        console.print(line(f"Skipped a malformed row: {e}", style="yellow"))


def prices_table(rows: list[dict], width: int = 120) -> tuple[Table, list[Text]]:
    """Every price, its source a footnote number; returns the table and the footnotes (sources, and what
    '*' on a date means)."""
    sources: dict[str, int] = {}
    out = table("Prices (first match wins: refreshed before bundled)", ("instance", "left", True),
                ("region", "left", True), ("platform", "left", True), ("market", "left", True),
                ("$/hour", "right", True), ("date", "left", True), ("src", "right", True), width=width)
    for r in rows:
        number = sources.setdefault(r["source"], len(sources) + 1)
        out.add_row(plain(r["instance_type"]), plain(r["region"]), plain(r["platform"]), plain(r["market"]),
                    f"{r['usd_per_hour']:,.4f}", plain(r["date"] + ("*" if r["warning"] else "")), f"[{number}]")
    notes = [line(f"[{n}] {source}", style="dim") for source, n in sources.items()]
    if any(r["warning"] for r in rows):
        notes.append(line("* older than the catalog's stale limit; refresh with: ftplan prices refresh",
                          style="yellow"))
    return out, notes
