"""run and plugins: carry out an accepted plan with a trainer backend; list the plugins."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ftplan.cli.json_stdout import stdout_kept_for_json
from ftplan.cli.options import DEVICES, console, key_values
from ftplan.errors import printable


@click.command()
@click.argument("plan_file", metavar="[PLAN]", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"))
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="training data: JSONL (text, prompt/completion or messages) or a datasets directory")
@click.option("--eval-data", type=click.Path(path_type=Path), default=None, help="validation data, same formats")
@click.option("--backend", default=None, help="trainer backend [default: the plan's]")
@click.option("--output", type=click.Path(path_type=Path), default=Path("ftplan-output"), show_default=True)
@click.option("--model-path", default=None, help="local model directory or Hugging Face id [default: the plan's]")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="stop after N optimizer steps")
@click.option("--save-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="optimizer steps between checkpoints")
@click.option("--resume", is_flag=True, help="continue from the last checkpoint in --output")
@click.option("--force", is_flag=True, help="replace a previous run's outputs in --output")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="where to train (auto: cuda when torch sees a GPU, else cpu)")
@click.option("--option", "raw_options", multiple=True, metavar="KEY=VALUE", help="backend-specific option")
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own Python code (off by default)")
@click.option("--here", is_flag=True, help="train on this machine even where its hardware differs from the plan's "
              "(the summary records it)")
@click.option("--dry-run", is_flag=True, help="print what a cloud backend would launch (YAML; JSON with --json); "
              "start nothing")
@click.option("--json", "as_json", is_flag=True, help="print summary.json instead of the progress display")
def run(plan_file: Path, data: Path, eval_data: Path | None, backend: str | None, output: Path,
        model_path: str | None, max_steps: int | None, save_every: int, resume: bool, force: bool, device: str,
        raw_options: tuple[str, ...], trust_remote_code: bool, here: bool, dry_run: bool, as_json: bool) -> None:
    """Carry out an accepted PLAN [default: ftplan-plan.yaml] with a trainer backend.

    Checks the plan against the backend first; writes the adapter (or model), tokenizer, plan.yaml,
    metrics.jsonl, checkpoints and summary.json into --output. Ctrl-C saves a checkpoint.
    Backend options (--option KEY=VALUE; e.g. --option role=ARN for sagemaker) are listed by ftplan plugins.
    """
    from ftplan.run.backend import RunRequest
    from ftplan.run.execute import describe, execute, notices, prepare

    request = RunRequest(data=data, eval_data=eval_data, output_dir=output, model_path=model_path,
                         max_steps=max_steps, save_every=save_every, resume=resume,
                         trust_remote_code=trust_remote_code, device=device, here=here, dry_run=dry_run)
    plan, chosen, options = prepare(plan_file, request, backend_name=backend, raw_options=key_values(raw_options),
                                    force=force)
    if dry_run:  # YAML to read (a SkyPilot task is YAML anyway), JSON with --json
        described = describe(plan, chosen, options, request)
        if as_json:
            import json as json_mod

            click.echo(json_mod.dumps(described, indent=2))
        else:
            click.echo(_yaml(described), nl=False)
        return
    for line in notices(plan, chosen, options, request):
        click.echo(f"ftplan: warning: {line}", err=True)
    if as_json:
        with stdout_kept_for_json():
            summary = execute(plan, chosen, options, request, lambda event: None)
    else:
        from ftplan.render.run import print_run_start, print_summary, progress_display
        from ftplan.run.datanotes import data_notes

        out = console()
        print_run_start(plan, chosen, request, out, data_notes(plan, request))
        with progress_display(out) as show:
            summary = execute(plan, chosen, options, request, show)
        print_summary(summary, out)
    if as_json:
        click.echo(summary.model_dump_json(indent=2))
    if summary.result.interrupted:
        click.echo(printable(f"ftplan: interrupted after step {summary.result.steps}; a checkpoint is saved. Continue "
                             f"with: ftplan run {plan_file} --data {data} --output {output} --resume"), err=True)
        sys.exit(130)


def _yaml(data: dict) -> str:
    """YAML with multi-line strings (scripts) as literal blocks, as they would be written by hand."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, width=120)


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True)
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their backends (methods, platforms and --option keys), and broken plugins with
    their error."""
    import json as json_mod

    from ftplan.run import registry as plugin_mod

    rows = plugin_mod.describe()
    if as_json:
        click.echo(json_mod.dumps(rows, indent=2))
        return
    from ftplan.render.run import plugins_table

    console().print(plugins_table(rows, plugin_mod.allowed_plugins()))
