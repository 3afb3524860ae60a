"""Rich rendering of the core's pydantic models. The only module that formats numbers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftplan.data import catalog
from ftplan.estimate.memory import END_OF_BACKWARD
from ftplan.estimate.report import EstimateReport, MethodEstimate
from ftplan.render.console import styled

GIB = 2**30
BAR_WIDTH = 40
SEGMENTS = (("weights", "blue"), ("adapters", "cyan"), ("gradients", "magenta"), ("optimizer", "yellow"),
            ("activations", "green"), ("transient", "red"))


def gib(n: int | float) -> str:
    """Sizes in GiB, or MiB below 1 GiB so small models do not read 0.00."""
    if abs(n) < GIB:
        return f"{n / 2**20:,.1f} MiB"
    return f"{n / GIB:,.2f} GiB"


def count(n: int) -> str:
    """Parameter counts in full, with a short form: 6,738,415,616 (6.74B)."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"


def _segments(e: MethodEstimate) -> list[tuple[str, int, str]]:
    m = e.memory
    values = {"weights": m.weights_bytes, "adapters": m.adapter_bytes, "gradients": m.gradients_bytes,
              "optimizer": m.optimizer_bytes, "activations": m.activations_bytes, "transient": m.transient_bytes}
    if m.peak_phase == END_OF_BACKWARD:
        values["activations"] = 0  # at the end of backward the activations are freed
    else:
        values["gradients"] = 0  # before backward has run there are no gradients
    return [(name, values[name], colour) for name, colour in SEGMENTS]


def stacked_bar(e: MethodEstimate, scale: int) -> Text:
    """A bar whose segments are the memory terms at the peak, scaled to the largest method."""
    bar = Text()
    for _, value, colour in _segments(e):
        bar.append("█" * round(BAR_WIDTH * value / scale) if scale else "", style=colour)
    return bar


def comparison_table(report: EstimateReport) -> Table:
    full = next((e for e in report.estimates if e.method == "full"), None)
    table = Table(title=f"{report.model.name}: parameters and per-GPU memory", title_justify="left")
    for col, justify in (("", "left"), *((e.method, "right") for e in report.estimates)):
        table.add_column(col, justify=justify)

    def row(label: str, cells: list[str]) -> None:
        table.add_row(label, *cells)

    est = report.estimates
    row("total params", [count(e.total_params) for e in est])
    row("trainable params", [count(e.trainable_params) for e in est])
    row("trainable %", [f"{100 * e.trainable_fraction:.4g}%" for e in est])
    if full:
        row("vs full fine-tuning", [f"{full.trainable_params / e.trainable_params:,.0f}x fewer" if e is not full
                                    else "-" for e in est])
    row("LoRA targets", [", ".join(e.targets.names) + f" ({e.targets.source})" if e.targets else "all" for e in est])
    table.add_section()
    for label, attr in (("weights", "weights_bytes"), ("LoRA adapters", "adapter_bytes"),
                        ("gradients", "gradients_bytes"), ("optimizer states", "optimizer_bytes"),
                        ("paged optimizer states", "paged_optimizer_bytes"),
                        ("activations (saved)", "activations_bytes"), ("transient at peak", "transient_bytes")):
        row(label, [gib(getattr(e.memory, attr)) for e in est])
    row("weights by dtype", [", ".join(f"{k} {gib(v)}" for k, v in e.memory.weights_by_dtype.items()) for e in est])
    row("peak phase", [e.memory.peak_phase for e in est])
    table.add_section()
    row("peak allocated", [Text(gib(e.memory.peak_allocated_bytes), style="bold") for e in est])
    row("required (fits if <= GPU)", [Text(gib(e.memory.required_bytes), style="bold") for e in est])
    return table


def bars(report: EstimateReport) -> Table:
    scale = max(e.memory.peak_allocated_bytes for e in report.estimates)
    legend = [part for n, c in SEGMENTS for part in (("█", c), f" {n}  ")]
    table = Table(title=styled("peak allocated, by term: ", *legend),
                  show_header=False, box=None, title_justify="left")
    for e in report.estimates:
        table.add_row(e.method, stacked_bar(e, scale), gib(e.memory.peak_allocated_bytes))
    return table


def instances_table(report: EstimateReport) -> Table:
    where = report.region or "each in its own region"
    table = Table(title=f"cheapest instances whose GPU holds the requirement (on-demand, {where})",
                  title_justify="left")
    for col in ("method", "instance", "GPUs", "GPU memory", "headroom", "$/hour", "price date"):
        table.add_column(col, justify="left" if col in ("method", "instance") else "right",
                         no_wrap=col in ("instance", "price date"), min_width=10 if col == "price date" else None)
    for e in report.estimates:
        if not e.cheapest_instances:
            table.add_row(e.method, Text("no priced instance holds it on one GPU: shard it or pick a smaller method",
                                         style="red"),
                          *[""] * 5)
        for f in e.cheapest_instances:
            table.add_row(e.method, f.instance_type, f"{f.gpu_count} x {f.gpu}", gib(f.gpu_memory_bytes),
                          gib(f.headroom_bytes), f"{f.usd_per_hour:,.4g}", f.price_date or "")
    return table


def selected_lines(report: EstimateReport) -> list[Text]:
    lines = []
    for e in report.estimates:
        f = e.selected
        if f is None:
            continue
        if f.fits:
            lines.append(Text(f"{e.method}: fits on {f.instance_type} ({f.gpu}) with {gib(f.headroom_bytes)} to spare",
                              style="green"))
        else:
            why = f.reason or f"short by {gib(-f.headroom_bytes)}"
            lines.append(Text(f"{e.method}: does not fit on {f.instance_type} ({f.gpu}): {why}", style="red"))
    return lines


def quantization_notes(report: EstimateReport) -> list[str]:
    return [f"qlora: {count(e.unquantized_linear_params)} weights of linear layers stay unquantized under "
            "transformers 5 (bitsandbytes replaces only exact nn.Linear/Conv1D layers; nn.Linear subclasses and "
            "fused MoE experts stay bf16 and are upcast to fp32)"
            for e in report.estimates if e.method == "qlora" and e.unquantized_linear_params]


def sharded_table(report: EstimateReport) -> Table | None:
    """Per-GPU memory over several GPUs, when asked for."""
    rows = [e for e in report.estimates if e.sharded]
    if not rows:
        return None
    first = rows[0].sharded
    table = Table(title=f"Per GPU over {first.gpus} GPUs on {first.nodes} node(s), {first.sharding}"
                        + (f", offload {first.offload}" if first.offload != "none" else ""), title_justify="left")
    table.add_column("")
    for e in rows:
        table.add_column(e.method, justify="right")
    for label, key in (("weights (shard)", "weights_bytes"), ("gathered parameters", "gathered_bytes"),
                       ("gradients at the peak", "gradients_bytes"), ("optimizer states", "optimizer_bytes"),
                       ("communication buffers", "comm_buffer_bytes"), ("activations + transients", "other_bytes"),
                       ("peak allocated", "peak_allocated_bytes"), ("required per GPU", "required_bytes"),
                       ("host RAM per node: offloaded", "host_offload_bytes_per_node"),
                       ("host RAM per node: loading", "host_loading_bytes_per_node"),
                       ("checkpoint on disk per save", "checkpoint_bytes")):
        table.add_row(label, *(gib(getattr(e.sharded, key)) for e in rows))
    table.add_row("peak phase", *(e.sharded.peak_phase.split(" (")[0] for e in rows))
    return table


def smallest_counts_line(report: EstimateReport) -> list[str]:
    """Per method, the fewest rentable instances that hold it with parameter sharding, per GPU type: whole
    instances ('1 x p5e.48xlarge (8 x H200)'), never one GPU of a larger instance; unpriced types skipped."""
    out = []
    for e in report.estimates:
        best: dict[str, tuple[int, int, str]] = {}  # GPU -> (GPUs rented, instances, type)
        for inst_type, n in e.smallest_gpu_counts.items():
            inst = catalog.get_instance(inst_type)
            if n is None or inst.priced(report.region) is None:
                continue
            count = -(-n // inst.gpu_count)
            rented = count * inst.gpu_count
            if inst.gpu not in best or (rented, count) < best[inst.gpu][:2]:
                best[inst.gpu] = (rented, count, inst.type)
        if best:
            shown = sorted(best.items(), key=lambda kv: kv[1])[:6]
            out.append(f"{e.method}: fewest instances with ZeRO-3/FSDP sharding: " + ", ".join(
                f"{count} x {inst} ({rented} x {gpu})" for gpu, (rented, count, inst) in shown))
    return out


def print_estimate(report: EstimateReport, console: Console) -> None:
    m = report.model
    console.print(styled((m.name, "bold"), f" ({m.hf_id or 'no HF id'}), {m.model_type}, {m.layers} layers, "
                  f"hidden {m.hidden_size}, vocab {m.vocab_size:,}; from {m.source}; counted {m.counting}"
                  + (f"; licence: {m.license}" if m.license else "")))
    console.print(comparison_table(report))
    console.print(bars(report))
    for line in selected_lines(report):
        console.print(line)
    console.print(instances_table(report))
    if (table := sharded_table(report)) is not None:
        console.print(table)
    for line in smallest_counts_line(report):
        console.print(line)
    console.print("Assumptions:", style="dim")
    for note in report.assumptions + quantization_notes(report):
        console.print(f"- {note}", style="dim")
    prices = {f.price_source for e in report.estimates for f in e.cheapest_instances if f.price_source}
    for source in sorted(prices):
        console.print(f"Prices: {source}", style="dim")


def measure_table(report) -> Table:
    """Estimated against measured, term by term where both sides have the term."""
    est, got = report.estimated, report.measured
    table = Table(title=f"{report.model.name} {report.setup.method} on {report.device}: estimate vs measured "
                        f"({report.steps} step(s) after warm-up)", title_justify="left")
    for col in ("", "estimated", "measured"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("weights (+ quantization state, buffers)", gib(est.weights_bytes + est.adapter_bytes),
                  gib(got.weights_bytes))
    table.add_row("optimizer states", gib(est.optimizer_bytes + est.paged_optimizer_bytes), gib(got.optimizer_bytes))
    table.add_row("gradients (end of backward)", gib(est.gradients_bytes), gib(got.gradients_bytes))
    table.add_row("activations (end of forward)", gib(est.activations_bytes), gib(got.activations_bytes))
    table.add_row(Text("peak", style="bold"), gib(report.estimated_compared_bytes), gib(got.peak_allocated_bytes))
    for label, value in (("  tracker (live tensors)", got.peak_tracker_bytes),
                         ("  allocator (profiler)", got.peak_allocator_bytes),
                         ("  resident set (RSS)", got.peak_rss_bytes)):
        if value is not None:
            table.add_row(label, "", gib(value))
    table.add_row("error", f"{report.error_percent:+.1f}%", "")
    table.add_row("step time / throughput", "", f"{got.step_seconds:.2f} s, {got.tokens_per_second:,.0f} tokens/s")
    return table


def print_measure(report, console: Console) -> None:
    console.print(measure_table(report))
    got = report.measured
    if got.instruments_disagree_percent is not None and got.instruments_disagree_percent > 2:
        console.print(Text(f"- the CPU instruments disagree by {got.instruments_disagree_percent:.1f}% (over 2%): the "
                           "tracker misses what ops allocate inside themselves, which the allocator and RSS see; "
                           f"the peak was reached in {got.allocator_peak_at or 'an unnamed op'}", style="yellow"))
    if report.device == "cpu" and report.estimated.paged_optimizer_bytes:
        console.print("- paged optimizer states are counted in the peak on the CPU (no paged memory there)", style="dim")
    console.print("- activations measured include the loss; estimated excludes the loss's transient buffers", style="dim")
    if report.utilization is not None:
        predicted = report.predicted_tokens_per_second
        console.print(f"utilisation on {report.gpu}: {report.utilization:.0%} of the dense peak, "
                      f"{report.measured.tokens_per_second:,.0f} tokens/s (time model: {predicted:,.0f})"
                      + (f"; recorded in {report.calibration_file} for recommend" if report.calibration_file else
                         " (not recorded: --layers measures a cut-down model)"))


def models_table(rows: list[catalog.CatalogModel]) -> Table:
    table = Table(title="catalogued models", title_justify="left")
    for col in ("name", "HF id", "type", "layers", "hidden", "vocab", "licence"):
        table.add_column(col)
    for m in rows:
        c = m.config
        table.add_row(m.name, m.hf_id, c["model_type"],
                      str(c.get("num_hidden_layers") or c.get("n_layer")),
                      str(c.get("hidden_size") or c.get("n_embd") or c.get("n_embed")),
                      f"{c['vocab_size']:,}", m.license)
    return table


def instances_list(rows: list[catalog.Instance], region: str | None = None) -> Table:
    table = Table(title=f"catalogued instances (on-demand, {region or 'each in its own region'})",
                  title_justify="left")
    for col in ("instance", "GPU", "GPUs", "GiB/GPU", "vCPU", "RAM GiB", "interconnect", "$/hour", "price date"):
        table.add_column(col, justify="left" if col in ("instance", "GPU", "interconnect") else "right")
    for i in rows:
        gpu = catalog.gpu_of(i)
        price = i.priced(region)
        table.add_row(i.type, gpu.name, str(i.gpu_count), f"{gpu.memory_gib_reported:g}", str(i.vcpus),
                      f"{i.memory_gib:g}", i.interconnect, f"{price.usd_per_hour:,.4g}" if price else "n/a",
                      price.date if price else i.notes)
    return table
