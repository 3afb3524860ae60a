"""The planning and training commands: recommend, plan show, run, plugins. Parse, call the core, render."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click

from .cli import _console, choices_from, cli, load_plugin_catalog, setting_options
from .errors import PlannerError
from .settings import METHODS


class TokenCount(click.ParamType):
    """A token count: 20000000, 20M, 1.5B or 500k."""

    name = "tokens"
    SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace("_", "").replace(",", "")
        scale = self.SUFFIXES.get(text[-1:], 1)
        try:
            number = float(text[:-1] if scale > 1 else text)
        except ValueError:
            self.fail(f"'{value}' is not a token count; write e.g. 20000000, 20M or 1.5B", param, ctx)
        if not math.isfinite(number) or number <= 0 or number * scale > 10**15:
            self.fail(f"'{value}' must be a positive token count below 10^15", param, ctx)
        return int(number * scale)


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@cli.command()
@click.argument("model")
@click.option("--tokens", type=TokenCount(), default=None, help="tokens per epoch, e.g. 20M (packed sequences)")
@click.option("--dataset", type=click.Path(path_type=Path), default=None,
              help="JSONL with text, prompt/completion or messages: tokens are counted from it")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json (or its directory) for counting --dataset [default: the model's, if local]")
@click.option("--packing/--no-packing", default=None, help="pack examples into full sequences "
              "[default: on for --tokens, off for --dataset]")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--global-batch", type=int, default=16, show_default=True, help="sequences per optimizer step")
@click.option("--budget", type=float, default=None, help="maximum cost in USD")
@click.option("--deadline", type=float, default=None, help="maximum billed hours")
@click.option("--priority", type=click.Choice(["cost", "balanced", "quality"]), default="balanced", show_default=True)
@click.option("--task", type=click.Choice(["instruction", "domain-adaptation", "continued-pretraining"]),
              default="instruction", show_default=True, help="weighs the published quality evidence per method")
@click.option("--region", default="us-east-1", show_default=True)
@click.option("--spot", is_flag=True, help="spot prices (interruptible; checkpoint often)")
@click.option("--spot-discount", type=float, default=None, help="spot discount to assume, 0-1 [default: catalog]")
@click.option("--platform", type=click.Choice(["ec2", "sagemaker"]), default="ec2", show_default=True)
@click.option("--max-gpus", type=int, default=8, show_default=True, help="most GPUs in total")
@click.option("--methods", default="full,lora,qlora", show_default=True, help="methods to consider")
@click.option("--instances", "instance_list", default=None, help="comma-separated instance types to consider")
@setting_options(search=True)
@click.option("--backend", default="hf", show_default=True, help="trainer backend the plan names")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="learning rate [default: 2e-5 full, 2e-4 LoRA/QLoRA]")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"), show_default=True,
              help="plan file written on acceptance")
@click.option("--yes", "-y", is_flag=True, help="accept the recommended plan without asking")
@click.option("--force", is_flag=True, help="replace an existing plan file")
@click.option("--top", type=click.IntRange(1, 50), default=8, show_default=True, help="candidates shown")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object (writes only with --yes)")
def recommend(model: str, tokens: int | None, dataset: Path | None, tokenizer: Path | None, packing: bool | None,
              epochs: float, global_batch: int, budget: float | None, deadline: float | None, priority: str,
              task: str, region: str, spot: bool, spot_discount: float | None, platform: str, max_gpus: int,
              methods: str, instance_list: str | None, backend: str, learning_rate: float | None, output: Path,
              yes: bool, force: bool, top: int, as_json: bool, **settings) -> None:
    """Search methods x instances x settings and recommend one plan; accepting writes the plan file.

    Give the data as --tokens N or --dataset FILE.
    """
    from . import dataset as data_mod
    from .architectures import layout_for
    from .recommend import SearchRequest, search
    from .resolve import resolve_model

    if (tokens is None) == (dataset is None):
        raise PlannerError("give the training data as either --tokens N or --dataset FILE.jsonl")
    if output.is_dir():
        raise PlannerError(f"-o {output} is a directory; give a file name such as {output / 'ftplan-plan.yaml'}")
    if output.exists() and not force and (yes or not as_json):
        raise PlannerError(f"{output} already exists; choose another path with -o or pass --force to replace it")
    if yes or not as_json:
        from .files import check_writable

        check_writable(output.parent, f"-o {output}")
    fixed = {k for k, flag in (("optimizer", "optimizer"), ("grad_ckpt", "grad_ckpt"), ("targets", "lora_targets"))
             if settings.get(flag) is not None}
    micro = settings.get("batch_size")
    choices = choices_from(settings)
    load_plugin_catalog()
    spec = resolve_model(model)
    if tokens is not None:
        data = data_mod.from_token_count(tokens, choices.seq_len)
        if packing is False:
            raise PlannerError("--tokens counts packed sequences; use --dataset to plan without packing")
    else:
        tok = data_mod.find_tokenizer(tokenizer, Path(spec.local_dir) if spec.local_dir else None)
        if tokenizer is not None and tok is None:
            raise PlannerError(f"no tokenizer.json at {tokenizer}; pass the file or the directory holding it")
        data = data_mod.from_dataset(dataset, choices.seq_len, packing=bool(packing), tokenizer=tok)
    method_list = _list(methods) or []
    unknown = [m for m in method_list if m not in METHODS]
    if unknown or not method_list:
        raise PlannerError(f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; use a comma-separated "
                           f"subset of {', '.join(METHODS)}")
    request = SearchRequest(
        epochs=epochs, global_batch=global_batch, budget_usd=budget, deadline_hours=deadline, priority=priority,
        task=task, region=region, platform=platform, market="spot" if spot else "on-demand",
        spot_discount=spot_discount, max_gpus=max_gpus, methods=method_list, instances=_list(instance_list),
        micro_batch=micro)
    layout, _ = layout_for(spec)
    rec = search(spec, layout, data, request, choices, fixed)

    def accept() -> None:
        from . import plan as plan_mod  # only now: its schema classes cost startup time
        from .plugins import get_backend

        get_backend(backend)  # a plan names only a registered backend
        plan_mod.save(plan_mod.plan_from(spec, rec, backend=backend, learning_rate=learning_rate), output,
                      overwrite=force)

    if as_json:
        if yes:
            accept()
        click.echo(rec.model_dump_json(indent=2))
        return
    from .render_plan import print_recommendation

    console = _console()
    print_recommendation(rec, console, limit=top)
    if not yes:
        try:
            accepted = click.confirm(f"Accept this plan and write {output}?", default=False)
        except click.exceptions.Abort:
            raise PlannerError("no answer to the prompt; pass --yes to accept without asking") from None
        if not accepted:
            console.print("Not accepted; nothing written.")
            return
    accept()
    console.print(f"Plan written to {output}. Show it with: ftplan plan show {output}; "
                  f"run it with: ftplan run {output}")


@cli.group()
def plan() -> None:
    """Inspect accepted plan files."""


@plan.command("show")
@click.argument("path", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"))
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan_show(path: Path, as_json: bool) -> None:
    """Print the plan in PATH [default: ftplan-plan.yaml]."""
    from .plan import load

    loaded = load(path)
    if as_json:
        click.echo(loaded.model_dump_json(indent=2))
        return
    from .render_plan import print_plan

    print_plan(loaded, str(path), _console())


def _options(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PlannerError(f"--option '{pair}' must look like KEY=VALUE")
        out[key.strip()] = value
    return out


@cli.command()
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--option", "raw_options", multiple=True, metavar="KEY=VALUE", help="backend-specific option")
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own Python code (off by default)")
@click.option("--role", default=None, help="IAM role ARN for cloud backends (sagemaker)")
@click.option("--dry-run", is_flag=True, help="print the exact request a cloud backend would send; send nothing")
@click.option("--json", "as_json", is_flag=True, help="print summary.json instead of the progress display")
def run(plan_file: Path, data: Path, eval_data: Path | None, backend: str | None, output: Path,
        model_path: str | None, max_steps: int | None, save_every: int, resume: bool, force: bool, device: str,
        raw_options: tuple[str, ...], trust_remote_code: bool, role: str | None, dry_run: bool,
        as_json: bool) -> None:
    """Carry out an accepted PLAN [default: ftplan-plan.yaml] with a trainer backend.

    Checks the plan against the backend first; writes the adapter (or model), tokenizer, plan.yaml,
    metrics.jsonl, checkpoints and summary.json into --output. Ctrl-C saves a checkpoint.
    """
    from .backend import RunRequest
    from .run import execute, prepare

    request = RunRequest(data=data, eval_data=eval_data, output_dir=output, model_path=model_path,
                         max_steps=max_steps, save_every=save_every, resume=resume,
                         trust_remote_code=trust_remote_code, device=device, dry_run=dry_run)
    options_given = _options(raw_options)
    if role:
        options_given["role"] = role
    plan, chosen, options = prepare(plan_file, request, backend_name=backend, raw_options=options_given,
                                    force=force)
    if dry_run:
        try:
            described = chosen.dry_run(plan, request, options)
        except NotImplementedError:
            raise PlannerError(f"backend '{chosen.name}' has no dry run (it runs here); drop --dry-run") from None
        import json as json_mod

        click.echo(json_mod.dumps(described, indent=2))
        return
    if as_json:
        summary = execute(plan, chosen, options, request, lambda event: None)
    else:
        from .render_run import print_run_start, print_summary, progress_display

        console = _console()
        print_run_start(plan, chosen, request, console)
        with progress_display(console) as show:
            summary = execute(plan, chosen, options, request, show)
        print_summary(summary, console)
    if as_json:
        click.echo(summary.model_dump_json(indent=2))
    if summary.result.interrupted:
        click.echo(f"ftplan: interrupted after step {summary.result.steps}; a checkpoint is saved. Continue with: "
                   f"ftplan run {plan_file} --data {data} --output {output} --resume", err=True)
        sys.exit(130)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True)
def plugins_command(as_json: bool) -> None:
    """List loaded plugins, their backends and what those support, and broken plugins with their error."""
    import json as json_mod

    from . import plugins as plugin_mod

    reg = plugin_mod.registry()
    backends = reg.backends()
    rows = [{"name": p.name, "version": p.version, "source": p.source, "catalog_entries": p.catalog_entries,
             "backends": [{"name": b, "description": backends[b].description, "methods": list(backends[b].methods),
                           "platforms": list(backends[b].platforms)} for b in p.backends],
             "errors": p.errors} for p in reg.plugins.values()]
    if as_json:
        click.echo(json_mod.dumps(rows, indent=2))
        return
    from .render_run import plugins_table

    _console().print(plugins_table(rows, plugin_mod.allowed_plugins()))
