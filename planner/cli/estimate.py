"""estimate, measure, models, instances: parse, call the core, render."""

from __future__ import annotations

from pathlib import Path

import click

from ftplan.cli.json_stdout import stdout_kept_for_json
from ftplan.cli.options import (
    DEVICES,
    MemorySize,
    choices_from,
    console,
    load_plugin_catalog,
    plot_option,
    setting_options,
    with_plugin_catalog,
)
from ftplan.errors import PlannerError
from ftplan.estimate.settings import METHODS
from ftplan.estimate.sharding import OFFLOADS, SHARDINGS


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice([*METHODS, "all"]), default="all", show_default=True)
@setting_options()
@click.option("--gpu", default=None, help="judge this GPU (e.g. A100-80GB, 'RTX 4090'; any case, spaces and dashes "
              "ignored); lists instances with it")
@click.option("--gpu-memory", type=MemorySize(), default=None,
              help="judge a GPU ftplan does not know by its memory: 24GiB, 24GB (10^9 bytes) or 24576MiB; no price")
@click.option("--instance", default=None, help="judge this AWS instance type (e.g. g5.2xlarge)")
@click.option("--layers", type=int, default=None, help="keep every width but use N layers (as measure does)")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="micro-batches per optimizer step: above 1 the gradients are held through every micro-batch")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs in total (data parallel)")
@click.option("--nodes", type=int, default=1, show_default=True, help="instances the GPUs are spread over")
@click.option("--sharding", type=click.Choice(SHARDINGS), default=None,
              help="how state is split over the GPUs [default: none for 1 GPU, ddp for more]")
@click.option("--sync-each-batch", is_flag=True,
              help="FSDP with --grad-accum: reduce-scatter the gradients every micro-batch, as the Trainer does "
                   "with accelerator_config={'gradient_accumulation_kwargs': {'sync_each_batch': True}} [default: "
                   "the Trainer's no_sync, which holds every gradient unsharded until the last micro-batch]")
@click.option("--offload", type=click.Choice(OFFLOADS), default="none", show_default=True,
              help="move optimizer states (ZeRO) or parameters (ZeRO-3, FSDP) to host RAM")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="whose kernels the memory model follows: cuda (auto: what GPUs run) or cpu (to compare with "
                   "ftplan measure --device cpu)")
@click.option("--region", default=None, help="price instances in this region [default: each in its own - "
              "us-east-1 for the bundled catalog, a plugin's region for its hardware]")
@click.option("--trust-remote-code", is_flag=True, help="allow custom model code (fallback counting only)")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object instead of tables")
@plot_option("the memory breakdown per method")
def estimate(model: str, method: str, gpu: str | None, gpu_memory: int | None, instance: str | None,
             layers: int | None, grad_accum: int, gpus: int, nodes: int, sharding: str | None,
             sync_each_batch: bool, offload: str, device: str, region: str | None,
             trust_remote_code: bool, as_json: bool, plot: Path | None, **settings) -> None:
    """Exact parameters and per-GPU memory of MODEL for full, LoRA and QLoRA fine-tuning.

    MODEL is a catalog name (ftplan models), a Hugging Face id, or a path to a config.json.
    """
    from ftplan.estimate.report import estimate as run_estimate
    from ftplan.model.resolve import resolve_model
    from ftplan.model.spec import with_layers

    if sum(x is not None for x in (gpu, instance, gpu_memory)) > 1:
        raise PlannerError("pass either --gpu, --gpu-memory or --instance, not several")
    choices = choices_from(settings).model_copy(update={"sync_each_batch": sync_each_batch})
    spec = with_plugin_catalog(lambda: resolve_model(model))
    if layers is not None:
        spec = with_layers(spec, layers)
    methods = list(METHODS) if method == "all" else [method]
    report = with_plugin_catalog(lambda: run_estimate(spec, methods, choices, gpu=gpu, instance=instance,
                                                      trust_remote_code=trust_remote_code, gpus=gpus, nodes=nodes,
                                                      sharding=sharding, offload=offload, region=region,
                                                      device="cpu" if device == "cpu" else "cuda",
                                                      gpu_memory_bytes=gpu_memory, grad_accum=grad_accum))
    if plot is not None:
        from ftplan.render.plot import memory_svg, write_plot

        write_plot(plot, memory_svg(report))
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        from ftplan.render.estimate import print_estimate

        print_estimate(report, console())


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(METHODS), default="qlora", show_default=True)
@setting_options()
@click.option("--layers", type=int, default=None, help="keep every width but build N layers (fits wide models in RAM)")
@click.option("--steps", type=int, default=1, show_default=True, help="measured steps after one warm-up step")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="micro-batches per optimizer step: above 1 the gradients are held through every micro-batch")
@click.option("--rss/--no-rss", default=True, show_default=True,
              help="CPU: also measure the resident set of a child process (builds the model a second time)")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="where to run the steps (auto: cuda when torch sees a GPU, else cpu)")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object instead of a table")
def measure(model: str, method: str, layers: int | None, steps: int, grad_accum: int, rss: bool, device: str,
            as_json: bool, **settings) -> None:
    """Train MODEL for a few steps on random tokens and compare peak memory with the estimate.

    The model is built from its config with random weights (nothing is downloaded) by the same
    code the Hugging Face trainer backend uses. Needs the training extra.
    """
    from ftplan.measure.runner import measure as run_measure
    from ftplan.model.resolve import resolve_model
    from ftplan.model.spec import with_layers

    choices = choices_from(settings)
    spec = resolve_model(model)
    if layers is not None:
        spec = with_layers(spec, layers)
    with stdout_kept_for_json(as_json):
        report = run_measure(spec, method, choices, steps=steps, device=device, calibrate=layers is None, rss=rss,
                             grad_accum=grad_accum)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        from ftplan.render.estimate import print_measure

        print_measure(report, console())


@click.command()
@click.argument("query", required=False)
@click.option("--json", "as_json", is_flag=True)
def models(query: str | None, as_json: bool) -> None:
    """List catalogued models; QUERY filters by name, HF id or model type."""
    from ftplan.data import catalog

    load_plugin_catalog()
    rows = [m for m in catalog.models() if not query or query.lower() in " ".join(
            [m.name, m.hf_id, m.config["model_type"], *m.aliases, *(x for v in m.variants for x in (v.name, v.hf_id))]
            ).lower()]
    if as_json:
        click.echo("[" + ",\n".join(m.model_dump_json() for m in rows) + "]")
        return
    from ftplan.render.catalog import models_table

    out = console()
    out.print(models_table(rows, out.width))


@click.command()
@click.option("--gpu", default=None, help="only instances with this GPU")
@click.option("--min-gpu-memory", type=float, default=None, help="only GPUs with at least this many GiB")
@click.option("--region", default=None, help="show prices in this region [default: each instance's own]")
@click.option("--json", "as_json", is_flag=True)
def instances(gpu: str | None, min_gpu_memory: float | None, region: str | None, as_json: bool) -> None:
    """List catalogued instance types with their GPUs and prices (with price date and source)."""
    from ftplan.data import catalog

    load_plugin_catalog()
    if region is not None:
        from ftplan.estimate.cost import regions

        known = set().union(*(regions(p) for p in {p.platform for i in catalog.instances().values() for p in i.prices}))
        if region not in known:
            raise PlannerError(f"no prices for region '{region}'.{catalog.suggest(region, sorted(known))} Catalogued "
                               f"prices cover: {', '.join(sorted(known))}")
    wanted = catalog.get_gpu(gpu).name.lower() if gpu else None
    rows = [i for i in catalog.instances().values()
            if (not wanted or i.gpu.lower() == wanted)
            and (min_gpu_memory is None or catalog.gpu_of(i).memory_gib_reported >= min_gpu_memory)]
    if as_json:
        click.echo("[" + ",\n".join(i.model_dump_json() for i in rows) + "]")
        return
    from ftplan.render.catalog import instances_list, unpriced_lines

    out = console()
    out.print(instances_list(rows, region, out.width))
    for text in unpriced_lines(rows, region):
        out.print(text)


