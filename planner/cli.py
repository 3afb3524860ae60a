"""The `ftplan` command line: parse, call the core, render. No estimation logic lives here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from . import __version__
from .errors import PlannerError
from .settings import ATTENTIONS, METHODS, OPTIMIZERS, PRECISIONS, LoraSettings, SetupChoices

EXIT_BAD_INPUT = 2


def _console():
    from rich.console import Console

    # No repr highlighting: it re-scans every cell with regexes and costs startup time.
    return Console(highlight=False, emoji=False)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", str(exc)).removeprefix("Value error, ")
    return f"{where}: {msg}" if where and where not in msg else msg


def _targets(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise PlannerError("--lora-targets is empty; pass names such as q_proj,v_proj or all-linear")
    return names


def setting_options(*, search: bool = False):
    """The method and setting flags shared by estimate, measure and recommend.

    With `search`, micro-batch, optimizer and checkpointing default to None: recommend searches them.
    """
    batch_help = "micro-batch per GPU (sequences)" + (" [default: searched]" if search else "")
    options = [
        click.option("--batch-size", type=int, default=None if search else 1, show_default=not search,
                     help=batch_help),
        click.option("--seq-len", type=int, default=2048, show_default=True, help="tokens per sequence"),
        click.option("--lora-r", type=int, default=16, show_default=True, help="LoRA rank"),
        click.option("--lora-alpha", type=int, default=32, show_default=True, help="LoRA alpha"),
        click.option("--lora-dropout", type=float, default=0.05, show_default=True, help="LoRA dropout"),
        click.option("--lora-targets", default=None,
                     help="comma-separated module names, or all-linear [default: " +
                          ("searched: PEFT's default and all-linear]" if search else "PEFT's default for the model]")),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
                     help="[default: " + ("searched" if search else "adamw") + "; paged_adamw_32bit for qlora]"),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="[default: bf16-mixed; fp16 on GPUs without bf16]"),
        click.option("--grad-ckpt/--no-grad-ckpt", default=None,
                     help="gradient checkpointing [default: " + ("searched" if search else "on for qlora") + "]"),
        click.option("--attn", type=click.Choice(ATTENTIONS), default="sdpa", show_default=True,
                     help="attention implementation"),
        click.option("--quant", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True,
                     help="qlora 4-bit type"),
        click.option("--double-quant/--no-double-quant", default=True, show_default=True,
                     help="qlora double quantization of the absmax constants"),
    ]

    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def choices_from(kw: dict) -> SetupChoices:
    """The SetupChoices named by the shared setting options (removed from `kw`)."""
    lora = LoraSettings(r=kw.pop("lora_r"), alpha=kw.pop("lora_alpha"), dropout=kw.pop("lora_dropout"),
                        targets=_targets(kw.pop("lora_targets")))
    batch = kw.pop("batch_size")
    return SetupChoices(batch_size=batch if batch is not None else 1, seq_len=kw.pop("seq_len"), precision=kw.pop("precision"),
                        optimizer=kw.pop("optimizer"), grad_ckpt=kw.pop("grad_ckpt"), attention=kw.pop("attn"),
                        lora=lora, quant_type=kw.pop("quant"), double_quant=kw.pop("double_quant"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftplan")
def cli() -> None:
    """Plan LLM fine-tuning: exact parameters, per-GPU memory, instances and cost."""


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice([*METHODS, "all"]), default="all", show_default=True)
@setting_options()
@click.option("--gpu", default=None, help="judge this GPU (e.g. A100-80GB); lists instances with it")
@click.option("--instance", default=None, help="judge this AWS instance type (e.g. g5.2xlarge)")
@click.option("--layers", type=int, default=None, help="keep every width but use N layers (as measure does)")
@click.option("--trust-remote-code", is_flag=True, help="allow custom model code (fallback counting only)")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object instead of tables")
def estimate(model: str, method: str, gpu: str | None, instance: str | None, layers: int | None,
             trust_remote_code: bool, as_json: bool, **settings) -> None:
    """Exact parameters and per-GPU memory of MODEL for full, LoRA and QLoRA fine-tuning.

    MODEL is a catalog name (ftplan models), a Hugging Face id, or a path to a config.json.
    """
    from .estimate import estimate as run_estimate
    from .modelspec import with_layers
    from .resolve import resolve_model

    if gpu and instance:
        raise PlannerError("pass either --gpu or --instance, not both")
    choices = choices_from(settings)
    spec = resolve_model(model)
    if layers is not None:
        spec = with_layers(spec, layers)
    methods = list(METHODS) if method == "all" else [method]
    report = run_estimate(spec, methods, choices, gpu=gpu, instance=instance, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        from .render import print_estimate

        print_estimate(report, _console())


@cli.command()
@click.argument("model")
@click.option("--method", type=click.Choice(METHODS), default="qlora", show_default=True)
@setting_options()
@click.option("--layers", type=int, default=None, help="keep every width but build N layers (fits wide models in RAM)")
@click.option("--steps", type=int, default=1, show_default=True, help="measured steps after one warm-up step")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object instead of a table")
def measure(model: str, method: str, layers: int | None, steps: int, device: str, as_json: bool, **settings) -> None:
    """Train MODEL for a few steps on random tokens and compare peak memory with the estimate.

    The model is built from its config with random weights (nothing is downloaded) by the same
    code the Hugging Face trainer backend uses. Needs the training extra.
    """
    from .measure import measure as run_measure
    from .modelspec import with_layers
    from .resolve import resolve_model

    choices = choices_from(settings)
    spec = resolve_model(model)
    if layers is not None:
        spec = with_layers(spec, layers)
    report = run_measure(spec, method, choices, steps=steps, device=device, calibrate=layers is None)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        from .render import print_measure

        print_measure(report, _console())


@cli.command()
@click.argument("query", required=False)
@click.option("--json", "as_json", is_flag=True)
def models(query: str | None, as_json: bool) -> None:
    """List catalogued models; QUERY filters by name, HF id or model type."""
    from . import catalog

    rows = [m for m in catalog.models() if not query or query.lower() in
            f"{m.name} {m.hf_id} {m.config['model_type']} {' '.join(m.aliases)}".lower()]
    if as_json:
        click.echo("[" + ",\n".join(m.model_dump_json() for m in rows) + "]")
        return
    from .render import models_table

    _console().print(models_table(rows))


@cli.command()
@click.option("--gpu", default=None, help="only instances with this GPU")
@click.option("--min-gpu-memory", type=float, default=None, help="only GPUs with at least this many GiB")
@click.option("--json", "as_json", is_flag=True)
def instances(gpu: str | None, min_gpu_memory: float | None, as_json: bool) -> None:
    """List catalogued AWS instance types with their GPUs and prices (with price date and source)."""
    from . import catalog

    if gpu:
        catalog.get_gpu(gpu)
    rows = [i for i in catalog.instances().values()
            if (not gpu or i.gpu.lower() == gpu.lower())
            and (min_gpu_memory is None or catalog.gpu_of(i).memory_gib_reported >= min_gpu_memory)]
    if as_json:
        click.echo("[" + ",\n".join(i.model_dump_json() for i in rows) + "]")
        return
    from .render import instances_list

    _console().print(instances_list(rows))


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
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"), show_default=True,
              help="plan file written on acceptance")
@click.option("--yes", "-y", is_flag=True, help="accept the recommended plan without asking")
@click.option("--force", is_flag=True, help="replace an existing plan file")
@click.option("--top", type=click.IntRange(1, 50), default=8, show_default=True, help="candidates shown")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object (writes only with --yes)")
def recommend(model: str, tokens: int | None, dataset: Path | None, tokenizer: Path | None, packing: bool | None,
              epochs: float, global_batch: int, budget: float | None, deadline: float | None, priority: str,
              task: str, region: str, spot: bool, spot_discount: float | None, platform: str, max_gpus: int,
              methods: str, instance_list: str | None, backend: str, output: Path, yes: bool, force: bool,
              top: int, as_json: bool, **settings) -> None:
    """Search methods x instances x settings and recommend one plan; accepting writes the plan file.

    Give the data as --tokens N or --dataset FILE.
    """
    from . import dataset as data_mod
    from .architectures import layout_for
    from .recommend import SearchRequest, search
    from .resolve import resolve_model

    if (tokens is None) == (dataset is None):
        raise PlannerError("give the training data as either --tokens N or --dataset FILE.jsonl")
    if output.exists() and not force and (yes or not as_json):
        raise PlannerError(f"{output} already exists; choose another path with -o or pass --force to replace it")
    fixed = {k for k, flag in (("optimizer", "optimizer"), ("grad_ckpt", "grad_ckpt"), ("targets", "lora_targets"))
             if settings.get(flag) is not None}
    micro = settings.get("batch_size")
    choices = choices_from(settings)
    spec = resolve_model(model)
    if tokens is not None:
        data = data_mod.from_token_count(tokens, choices.seq_len)
        if packing is False:
            raise PlannerError("--tokens counts packed sequences; use --dataset to plan without packing")
    else:
        local = Path(model) if Path(model).exists() else None
        tok = data_mod.find_tokenizer(tokenizer, local, local.parent if local and local.is_file() else None)
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

        plan_mod.save(plan_mod.plan_from(spec, rec, backend=backend), output, overwrite=force)

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
    console.print(f"Plan written to {output}. Show it with: ftplan plan show {output}; run it with: ftplan run {output}")


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
        click.echo(f"ftplan: error: {exc.format_message()}" + (
            f" (see ftplan {exc.ctx.command.name} --help)" if exc.ctx and exc.ctx.command.name != "cli" else
            " (see ftplan --help)"), err=True)
        sys.exit(EXIT_BAD_INPUT)
    except PlannerError as exc:
        if debug:
            raise
        click.echo(f"ftplan: error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except ValidationError as exc:
        if debug:
            raise
        click.echo(f"ftplan: error: {_validation_message(exc)}", err=True)
        sys.exit(EXIT_BAD_INPUT)
