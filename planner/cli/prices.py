"""`ftplan prices`: refresh hourly rates from AWS and show where every price comes from."""

from __future__ import annotations

import click

from ftplan.cli.options import console
from ftplan.errors import PlannerError


@click.group()
def prices() -> None:
    """Refresh and inspect instance prices (bundled snapshot or AWS Price List)."""


@prices.command("refresh")
@click.option("--region", "regions", multiple=True, default=("us-east-1",), show_default=True,
              help="region code; repeat for several")
@click.option("--platform", type=click.Choice(["ec2", "sagemaker", "all"]), default="ec2", show_default=True)
@click.option("--spot", is_flag=True, help="also fetch recent EC2 spot prices (DescribeSpotPriceHistory)")
@click.option("--instances", "instance_list", default=None, help="comma-separated instance types [default: all]")
@click.option("--json", "as_json", is_flag=True)
def refresh(regions: tuple[str, ...], platform: str, spot: bool, instance_list: str | None, as_json: bool) -> None:
    """Query the AWS Price List API with your AWS credentials and cache the rates for later commands."""
    from ftplan.data import aws_prices, catalog, price_cache

    types = [t.strip() for t in instance_list.split(",") if t.strip()] if instance_list else None
    for t in types or []:
        catalog.get_instance(t)
    for r in regions:
        if not r or not r.replace("-", "").isalnum() or r.count("-") < 2:
            raise PlannerError(f"--region '{r}' is not a region code such as us-east-1")
    platforms = ["ec2", "sagemaker"] if platform == "all" else [platform]
    report = aws_prices.refresh(list(regions), platforms, types)
    if spot:
        spot_report = aws_prices.refresh_spot(list(regions), types)
        report.updated += spot_report.updated
        report.missing += spot_report.missing
        report.errors += spot_report.errors
    if report.updated:
        report.path = str(price_cache.save_cache(report.updated))
        catalog.clear_caches()
    if as_json:
        click.echo(report.model_dump_json(indent=2))
        return
    from ftplan.render.prices import print_refresh

    print_refresh(report, console())


@prices.command("show")
@click.option("--json", "as_json", is_flag=True)
def show(as_json: bool) -> None:
    """Every known price with its origin: refreshed (and when) or the bundled snapshot."""
    from ftplan.data import catalog

    rows = [{"instance_type": i.type, **p.model_dump(), "warning": catalog.stale_warning(p.date)}
            for i in catalog.instances().values() for p in i.prices]
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    from ftplan.render.prices import prices_table

    out = console()
    shown, notes = prices_table(rows, out.width)
    out.print(shown)
    for text in notes:
        out.print(text)
