"""plan show: print an accepted plan."""

from __future__ import annotations

from pathlib import Path

import click

from ftplan.cli.options import console


@click.group()
def plan() -> None:
    """Inspect accepted plan files."""


@plan.command("show")
@click.argument("path", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"))
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan_show(path: Path, as_json: bool) -> None:
    """Print the plan in PATH [default: ftplan-plan.yaml]."""
    from ftplan.plan import load

    loaded = load(path)
    if as_json:
        click.echo(loaded.model_dump_json(indent=2))
        return
    from ftplan.render.recommend import print_plan

    print_plan(loaded, str(path), console())


