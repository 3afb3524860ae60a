"""The `ftplan` command line: parse, call the core, render. No estimation logic lives here."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from ftplan import __version__
from ftplan.cli import estimate, plan, prices, recommend, run
from ftplan.cli.options import validation_message
from ftplan.errors import PlannerError, printable

EXIT_BAD_INPUT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftplan")
# main() reads --debug (anywhere on the line) before click parses; declared here so --help lists it
@click.option("--debug", is_flag=True, expose_value=False,
              help="on an error, show the full Python traceback instead of one line (works after any command too)")
def cli() -> None:
    """Plan LLM fine-tuning: exact parameters, per-GPU memory, instances and cost."""


for command in (estimate.estimate, estimate.measure, estimate.models, estimate.instances, recommend.recommend,
                plan.plan, run.run, run.plugins_command, prices.prices):
    cli.add_command(command)


def usage_message(exc: click.UsageError) -> str:
    """click's message, worded the same under click 8.1 and 8.2+ (the skypilot extra pins click<8.2, whose
    unknown-option message reads "No such option: --x")."""
    if isinstance(exc, click.exceptions.NoSuchOption):
        hint = f" Did you mean {', '.join(sorted(exc.possibilities))}?" if exc.possibilities else ""
        return f"No such option '{exc.option_name}'.{hint}"
    return exc.format_message()


def _line(message: str) -> str:
    # messages quote paths, names and values from outside: no control character and no line break gets through
    return " ".join(printable(message).split("\n"))


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--debug"]
    try:
        cli.main(args=args, prog_name="ftplan", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("ftplan: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        if debug:
            raise
        click.echo("ftplan: error: " + _line(usage_message(exc)) + (
            f" (see ftplan {exc.ctx.command.name} --help)" if exc.ctx and exc.ctx.command.name != "cli" else
            " (see ftplan --help)"), err=True)
        sys.exit(EXIT_BAD_INPUT)
    except PlannerError as exc:
        if debug:
            raise
        click.echo(f"ftplan: error: {_line(str(exc))}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except ValidationError as exc:
        if debug:
            raise
        click.echo(f"ftplan: error: {_line(validation_message(exc))}", err=True)
        sys.exit(EXIT_BAD_INPUT)
