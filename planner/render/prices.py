"""Rich rendering for `ftplan prices`: the refresh report and every price with its origin."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ftplan.render.console import styled


def print_refresh(report, console: Console) -> None:
    console.print(f"Refreshed {len(report.updated)} price(s)" + (f" into {report.path}" if report.path else ""))
    for p in report.updated:
        console.print(f"  {p.instance_type:<20} {p.region:<14} {p.platform:<9} {p.market:<9} ${p.usd_per_hour:,.4f}/h")
    if report.missing:
        console.print(f"No product for {len(report.missing)}: {', '.join(report.missing[:8])}"
                      + (" ..." if len(report.missing) > 8 else "") + " (the bundled price, if any, stays)", style="dim")
    for e in report.errors:
        console.print(f"Skipped a malformed row: {e}", style="yellow")


def prices_table(rows: list[dict]) -> Table:
    table = Table(title="Prices (first match wins: refreshed before bundled)", title_justify="left")
    for col in ("instance", "region", "platform", "market", "$/hour", "date", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["instance_type"], r["region"], r["platform"], r["market"], f"{r['usd_per_hour']:,.4f}",
                      styled(r["date"], (" (old)", "yellow") if r["warning"] else ""), r["source"])
    return table
