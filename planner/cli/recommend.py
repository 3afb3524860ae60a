"""recommend: search methods x instances x settings, explain, accept a plan."""

from __future__ import annotations

from pathlib import Path

import click

from ftplan.cli.options import TokenCount, choices_from, console, load_plugin_catalog, setting_options, split_list
from ftplan.errors import PlannerError
from ftplan.estimate.settings import METHODS


@click.command()
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
    from ftplan.data import dataset as data_mod
    from ftplan.model.inventory import layout_for
    from ftplan.model.resolve import resolve_model
    from ftplan.recommend.search import SearchRequest, search

    if (tokens is None) == (dataset is None):
        raise PlannerError("give the training data as either --tokens N or --dataset FILE.jsonl")
    if output.is_dir():
        raise PlannerError(f"-o {output} is a directory; give a file name such as {output / 'ftplan-plan.yaml'}")
    if output.exists() and not force and (yes or not as_json):
        raise PlannerError(f"{output} already exists; choose another path with -o or pass --force to replace it")
    if yes or not as_json:
        from ftplan.data.files import check_writable

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
    method_list = split_list(methods) or []
    unknown = [m for m in method_list if m not in METHODS]
    if unknown or not method_list:
        raise PlannerError(f"--methods: unknown method(s) {', '.join(unknown) or '(none)'}; use a comma-separated "
                           f"subset of {', '.join(METHODS)}")
    request = SearchRequest(
        epochs=epochs, global_batch=global_batch, budget_usd=budget, deadline_hours=deadline, priority=priority,
        task=task, region=region, platform=platform, market="spot" if spot else "on-demand",
        spot_discount=spot_discount, max_gpus=max_gpus, methods=method_list, instances=split_list(instance_list),
        micro_batch=micro)
    layout, _ = layout_for(spec)
    rec = search(spec, layout, data, request, choices, fixed)

    def accept() -> None:
        from ftplan import plan as plan_mod  # only now: its schema classes cost startup time
        from ftplan.run.registry import get_backend

        get_backend(backend)  # a plan names only a registered backend
        plan_mod.save(plan_mod.plan_from(spec, rec, backend=backend, learning_rate=learning_rate), output,
                      overwrite=force)

    if as_json:
        if yes:
            accept()
        click.echo(rec.model_dump_json(indent=2))
        return
    from ftplan.render.recommend import print_recommendation

    out = console()
    print_recommendation(rec, out, limit=top)
    if not yes:
        try:
            accepted = click.confirm(f"Accept this plan and write {output}?", default=False)
        except click.exceptions.Abort:
            raise PlannerError("no answer to the prompt; pass --yes to accept without asking") from None
        if not accepted:
            out.print("Not accepted; nothing written.")
            return
    accept()
    out.print(f"Plan written to {output}. Show it with: ftplan plan show {output}; "
                  f"run it with: ftplan run {output}")


