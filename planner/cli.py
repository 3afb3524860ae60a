"""The `ftplan` command line: parse, call the core, render. No estimation logic lives here."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from . import __version__
from .errors import PlannerError
from .settings import ATTENTIONS, METHODS, OPTIMIZERS, PRECISIONS, LoraSettings, SetupChoices
from .sharding import OFFLOADS, SHARDINGS

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


def load_plugin_catalog() -> None:
    """Merge plugins' catalog entries (models, GPUs, instances); loads plugins once."""
    from .plugins import registry

    registry()


def with_plugin_catalog(lookup):
    """Run `lookup`; if a name is not in the bundled catalog, load the plugins' entries and try again.
    Keeps plugin loading (an entry-point scan) off the estimate path unless it is needed."""
    try:
        return lookup()
    except PlannerError:
        from .plugins import registry  # imports pluggy: only on a miss

        if registry.cache_info().currsize:
            raise
        registry()
        return lookup()


def choices_from(kw: dict) -> SetupChoices:
    """The SetupChoices named by the shared setting options (removed from `kw`)."""
    lora = LoraSettings(r=kw.pop("lora_r"), alpha=kw.pop("lora_alpha"), dropout=kw.pop("lora_dropout"),
                        targets=_targets(kw.pop("lora_targets")))
    batch = kw.pop("batch_size")
    return SetupChoices(batch_size=batch if batch is not None else 1, seq_len=kw.pop("seq_len"),
                        precision=kw.pop("precision"),
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
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs in total (data parallel)")
@click.option("--nodes", type=int, default=1, show_default=True, help="instances the GPUs are spread over")
@click.option("--sharding", type=click.Choice(SHARDINGS), default=None,
              help="how state is split over the GPUs [default: none for 1 GPU, ddp for more]")
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True,
              help="move optimizer states (ZeRO) or parameters (ZeRO-3, FSDP) to host RAM")
@click.option("--trust-remote-code", is_flag=True, help="allow custom model code (fallback counting only)")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object instead of tables")
def estimate(model: str, method: str, gpu: str | None, instance: str | None, layers: int | None, gpus: int,
             nodes: int, sharding: str | None, offload: str, trust_remote_code: bool, as_json: bool,
             **settings) -> None:
    """Exact parameters and per-GPU memory of MODEL for full, LoRA and QLoRA fine-tuning.

    MODEL is a catalog name (ftplan models), a Hugging Face id, or a path to a config.json.
    """
    from .estimate import estimate as run_estimate
    from .modelspec import with_layers
    from .resolve import resolve_model

    if gpu and instance:
        raise PlannerError("pass either --gpu or --instance, not both")
    choices = choices_from(settings)
    spec = with_plugin_catalog(lambda: resolve_model(model))
    if layers is not None:
        spec = with_layers(spec, layers)
    methods = list(METHODS) if method == "all" else [method]
    report = with_plugin_catalog(lambda: run_estimate(spec, methods, choices, gpu=gpu, instance=instance,
                                                      trust_remote_code=trust_remote_code, gpus=gpus, nodes=nodes,
                                                      sharding=sharding, offload=offload))
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

    load_plugin_catalog()
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

    load_plugin_catalog()
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


from . import cli_plan, cli_prices  # noqa: E402,F401  (they register their commands on the group)


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
