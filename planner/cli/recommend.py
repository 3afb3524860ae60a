"""recommend: search methods x instances x settings, explain, accept a plan."""

from __future__ import annotations

from pathlib import Path

import click

from ftplan.cli.options import (
    TokenCount,
    choices_from,
    console,
    load_plugin_catalog,
    plot_option,
    setting_options,
    split_list,
)
from ftplan.errors import PlannerError
from ftplan.estimate.settings import METHODS


@click.command()
@click.argument("model")
@click.option("--tokens", type=TokenCount(), default=None, help="tokens per epoch, e.g. 20M (packed sequences)")
@click.option("--dataset", type=click.Path(path_type=Path), default=None,
              help="JSONL with text, prompt/completion or messages: tokens are counted from it")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="tokenizer.json (or its directory) for counting --dataset [default: the model's, if local]")
@click.option("--count", "counting", type=click.Choice(["auto", "exact", "sample"]), default="auto",
              show_default=True, help="--dataset: tokenize every line (exact), a sample with its error stated "
              "(sample), or exact up to 64 MiB and sampled above (auto)")
@click.option("--packing/--no-packing", default=None, help="pack examples into full sequences "
              "[default: on for --tokens, off for --dataset]")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="passes over the data (at most 1000)")
@click.option("--global-batch", type=int, default=16, show_default=True, help="sequences per optimizer step")
@click.option("--budget", type=float, default=None, help="maximum cost in USD")
@click.option("--deadline", type=float, default=None, help="maximum billed hours")
@click.option("--priority", type=click.Choice(["cost", "balanced", "quality"]), default="balanced", show_default=True)
@click.option("--task", type=click.Choice(["instruction", "domain-adaptation", "continued-pretraining"]),
              default="instruction", show_default=True, help="weighs the published quality evidence per method")
@click.option("--region", default=None, help="price region [default: us-east-1, or the platform's only region]")
@click.option("--spot", is_flag=True, help="spot prices (interruptible; checkpoint often)")
@click.option("--spot-discount", type=float, default=None, help="spot discount to assume, 0-1 [default: catalog]")
@click.option("--platform", default=None, help="ec2, sagemaker, or a plugin's platform [default: the backend's, "
              "else ec2]")
@click.option("--max-gpus", type=int, default=8, show_default=True, help="most GPUs in total")
@click.option("--methods", default="full,lora,qlora", show_default=True, help="methods to consider")
@click.option("--instances", "instance_list", default=None, help="comma-separated instance types to consider")
@setting_options(search=True)
@click.option("--backend", default=None, help="trainer backend that carries the plan out; the search covers only "
              "its methods and platforms [default: sagemaker for --platform sagemaker, skypilot for ec2 if installed, "
              "else hf]")
@click.option("--allow-long-context", is_flag=True, help="plan a --seq-len above the model's max_position_embeddings")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, max=1, min_open=True), default=None,
              help="learning rate [default: 2e-5 full, 2e-4 LoRA/QLoRA]")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("ftplan-plan.yaml"), show_default=True,
              help="plan file written on acceptance")
@click.option("--yes", "-y", is_flag=True, help="accept the recommended plan without asking")
@click.option("--force", is_flag=True, help="replace an existing plan file")
@click.option("--top", type=click.IntRange(1, 50), default=8, show_default=True, help="candidates shown")
@click.option("--json", "as_json", is_flag=True, help="print the documented JSON object (writes only with --yes)")
@plot_option("the cost-versus-time frontier")
def recommend(model: str, tokens: int | None, dataset: Path | None, tokenizer: Path | None, counting: str,
              packing: bool | None,
              epochs: float, global_batch: int, budget: float | None, deadline: float | None, priority: str,
              task: str, region: str | None, spot: bool, spot_discount: float | None, platform: str | None,
              max_gpus: int, methods: str, instance_list: str | None, backend: str | None,
              allow_long_context: bool, learning_rate: float | None, output: Path, yes: bool, force: bool, top: int,
              as_json: bool, plot: Path | None, **settings) -> None:
    """Search methods x instances x settings and recommend one plan; accepting writes the plan file.

    Give the data as --tokens N or --dataset FILE. The plan names the backend that carries it out:
    --backend, else sagemaker for --platform sagemaker, skypilot for EC2 when installed, else hf.
    """
    from ftplan.estimate.cost import default_region
    from ftplan.model.inventory import layout_for
    from ftplan.model.resolve import resolve_model
    from ftplan.recommend.search import SearchRequest, search
    from ftplan.run.registry import backend_for

    _check_output(output, force=force, writes=yes or not as_json)
    fixed = {k for k, flag in (("optimizer", "optimizer"), ("grad_ckpt", "grad_ckpt"), ("targets", "lora_targets"))
             if settings.get(flag) is not None}
    micro = settings.get("batch_size")
    choices = choices_from(settings)
    load_plugin_catalog()
    spec = resolve_model(model)
    if (limit := spec.dims.max_positions) and choices.seq_len > limit and not allow_long_context:
        raise PlannerError(f"--seq-len {choices.seq_len} is above {spec.name}'s max_position_embeddings ({limit}); "
                           "use a shorter --seq-len, or pass --allow-long-context to plan it anyway")
    data = _token_budget(spec, tokens, dataset, tokenizer, packing, choices.seq_len, counting)
    chosen, platform, method_list, why = backend_for(backend, platform, _methods(methods))
    request = SearchRequest(
        epochs=epochs, global_batch=global_batch, budget_usd=budget, deadline_hours=deadline, priority=priority,
        task=task, region=region or default_region(platform), platform=platform,
        market="spot" if spot else "on-demand", spot_discount=spot_discount, max_gpus=max_gpus,
        methods=method_list, instances=split_list(instance_list), micro_batch=micro)
    rec = search(spec, layout_for(spec)[0], data, request, choices, fixed)
    rec = rec.model_copy(update={"backend": chosen.name, "backend_reason": why})
    if plot is not None:
        from ftplan.render.plot import frontier_svg, write_plot

        write_plot(plot, frontier_svg(rec))
    _present(rec, spec, learning_rate=learning_rate, output=output, force=force, yes=yes, as_json=as_json, top=top)


def _present(rec, spec, *, learning_rate: float | None, output: Path, force: bool, yes: bool, as_json: bool,
             top: int) -> None:
    """Print the recommendation (table or JSON) and write the plan file once it is accepted."""

    def accept() -> None:
        from ftplan import plan as plan_mod  # only now: its schema classes cost startup time

        plan_mod.save(plan_mod.plan_from(spec, rec, backend=rec.backend, learning_rate=learning_rate), output,
                      overwrite=force)

    if as_json:
        if yes:
            accept()
        click.echo(rec.model_dump_json(indent=2))
        return
    from ftplan.render.recommend import print_recommendation

    out = console()
    print_recommendation(rec, out, limit=top)
    if not yes and not _ask(f"Accept this plan and write {output}?"):
        out.print("Not accepted; nothing written. Accept without the prompt with --yes.")
        return
    accept()
    out.print(f"Plan written to {output}. Show it with: ftplan plan show {output}; "
              f"run it with: ftplan run {output} --data DATA")


def _ask(question: str) -> bool:
    """The user's answer; False without asking when nobody can answer (stdin is not a terminal)."""
    import sys

    if not sys.stdin.isatty():
        return False
    try:
        return click.confirm(question, default=False)
    except click.exceptions.Abort:
        return False


def _check_output(output: Path, *, force: bool, writes: bool) -> None:
    """Refuse a plan path that cannot be written before searching."""
    if output.is_dir():
        raise PlannerError(f"-o {output} is a directory; give a file name such as {output / 'ftplan-plan.yaml'}")
    if writes and output.exists() and not force:
        raise PlannerError(f"{output} already exists; choose another path with -o or pass --force to replace it")
    if writes:
        from ftplan.data.files import check_writable

        check_writable(output.parent, f"-o {output}")


def _methods(value: str) -> list[str]:
    method_list = split_list(value) or []
    unknown = [m for m in method_list if m not in METHODS]
    if unknown or not method_list:
        raise PlannerError(f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; use a comma-separated "
                           f"subset of {', '.join(METHODS)}")
    return method_list


def _token_budget(spec, tokens: int | None, dataset: Path | None, tokenizer: Path | None, packing: bool | None,
                  seq_len: int, counting: str = "auto"):
    """The data to plan for: --tokens (packed) or a JSONL --dataset counted with the model's tokenizer."""
    from ftplan.data import dataset as data_mod

    if (tokens is None) == (dataset is None):
        raise PlannerError("give the training data as either --tokens N or --dataset FILE.jsonl")
    if tokens is not None:
        if packing is False:
            raise PlannerError("--tokens counts packed sequences; use --dataset to plan without packing")
        return data_mod.from_token_count(tokens, seq_len)
    tok = data_mod.find_tokenizer(tokenizer, Path(spec.local_dir) if spec.local_dir else None)
    if tokenizer is not None and tok is None:
        raise PlannerError(f"no tokenizer.json at {tokenizer}; pass the file or the directory holding it")
    return data_mod.from_dataset(dataset, seq_len, packing=bool(packing), tokenizer=tok, counting=counting)
