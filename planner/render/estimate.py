"""Rich rendering of estimate and measure reports: sizes and counts in words, tables that fit the terminal.

Everything shown from outside ftplan (model names, paths, plugin catalog entries) goes through
render.console's clean/plain/line, never through markup."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftplan.data import catalog
from ftplan.estimate.memory import END_OF_BACKWARD
from ftplan.estimate.report import EstimateReport, MethodEstimate
from ftplan.render.console import clean, line, plain, table

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


def memory_segments(e: MethodEstimate) -> list[tuple[str, int, str]]:
    """The memory terms at the method's peak (name, bytes, colour), in SEGMENTS order."""
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
    for _, value, colour in memory_segments(e):
        bar.append("█" * round(BAR_WIDTH * value / scale) if scale else "", style=colour)
    return bar


def comparison_table(report: EstimateReport, width: int = 120) -> Table:
    """Parameters and memory terms, one column per method."""
    full = next((e for e in report.estimates if e.method == "full"), None)
    out = table(line(report.model.name, ": parameters and per-GPU memory"), "",
                *((e.method, "right") for e in report.estimates), width=width)

    def row(label: str, cells: list) -> None:
        out.add_row(label, *cells)

    est = report.estimates
    row("total params", [count(e.total_params) for e in est])
    row("trainable params", [count(e.trainable_params) for e in est])
    row("trainable %", [f"{100 * e.trainable_fraction:.4g}%" for e in est])
    if full:
        row("vs full fine-tuning", [f"{full.trainable_params / e.trainable_params:,.0f}x fewer" if e is not full
                                    else "-" for e in est])
    row("LoRA targets", [plain(", ".join(e.targets.names) + f" ({e.targets.source})") if e.targets else "all"
                         for e in est])
    out.add_section()
    for label, attr in (("weights", "weights_bytes"), ("LoRA adapters", "adapter_bytes"),
                        ("gradients", "gradients_bytes"), ("optimizer states", "optimizer_bytes"),
                        ("paged optimizer states", "paged_optimizer_bytes"),
                        ("activations (saved)", "activations_bytes"), ("transient at peak", "transient_bytes")):
        row(label, [gib(getattr(e.memory, attr)) for e in est])
    row("weights by dtype", [", ".join(f"{k} {gib(v)}" for k, v in e.memory.weights_by_dtype.items()) for e in est])
    row("peak phase", [e.memory.peak_phase for e in est])
    out.add_section()
    row("peak allocated", [Text(gib(e.memory.peak_allocated_bytes), style="bold") for e in est])
    row("required (fits if <= GPU)", [Text(gib(e.memory.required_bytes), style="bold") for e in est])
    return out


def bars(report: EstimateReport) -> Table:
    """One stacked bar per method, the memory terms at its peak."""
    scale = max(e.memory.peak_allocated_bytes for e in report.estimates)
    legend = [part for n, c in SEGMENTS for part in (("█", c), f" {n}  ")]
    out = Table(title=line("peak allocated, by term: ", *legend), show_header=False, box=None, title_justify="left")
    for e in report.estimates:
        out.add_row(e.method, stacked_bar(e, scale), gib(e.memory.peak_allocated_bytes))
    return out


def _price_dates(report: EstimateReport) -> set[str]:
    return {f.price_date for e in report.estimates for f in e.cheapest_instances if f.price_date}


def instances_table(report: EstimateReport, width: int = 120) -> Table | None:
    """The cheapest instances per method; None when no method fits on any (`unplaced_lines` says so). The
    price date is a column only when the prices shown differ in date (else the Prices line carries it)."""
    rows = [(e, f) for e in report.estimates for f in e.cheapest_instances]
    if not rows:
        return None
    dated = len(_price_dates(report)) > 1
    where = clean(report.region or "each in its own region")
    out = table(f"cheapest instances whose GPU holds the requirement (on-demand, {where})", "method", "instance",
                ("GPUs", "right"), ("GPU memory", "right"), ("headroom", "right"), ("$/hour", "right"),
                *((("price date", "right"),) if dated else ()), width=width)
    for e, f in rows:
        out.add_row(e.method, plain(f.instance_type), plain(f"{f.gpu_count} x {f.gpu}"), gib(f.gpu_memory_bytes),
                    gib(f.headroom_bytes), f"{f.usd_per_hour:,.4g}", *((plain(f.price_date or ""),) if dated else ()))
    return out


def unplaced_lines(report: EstimateReport) -> list[Text]:
    """Methods no priced instance holds on one GPU, and a --gpu no catalogued instance carries."""
    if report.gpu and not any(i.gpu.lower() == report.gpu.lower() for i in catalog.instances().values()):
        return [line(f"No catalogued instance has {report.gpu} GPUs: the verdict above judges one on its own, "
                     "without a price.")]
    if report.gpu_memory_bytes is not None:
        return []
    return [line(f"{e.method}: no priced instance" + (f" with {report.gpu} GPUs" if report.gpu else "")
                 + " holds it on one GPU: shard it over several (--gpus N --sharding fsdp) or pick a smaller method",
                 style="red") for e in report.estimates if not e.cheapest_instances]


def selected_lines(report: EstimateReport) -> list[Text]:
    """The --gpu, --gpu-memory or --instance verdict per method."""
    lines = []
    for e in report.estimates:
        f = e.selected
        if f is None:
            continue
        where = f"{f.instance_type} ({f.gpu})" if f.instance_type else f"one {f.gpu} ({gib(f.gpu_memory_bytes)})"
        if f.fits:
            lines.append(line(f"{e.method}: fits on {where} with {gib(f.headroom_bytes)} to spare", style="green"))
        else:
            why = f.reason or f"short by {gib(-f.headroom_bytes)}"
            lines.append(line(f"{e.method}: does not fit on {where}: {why}", style="red"))
    return lines


def quantization_notes(report: EstimateReport) -> list[str]:
    return [f"qlora: {count(e.unquantized_linear_params)} weights of linear layers stay unquantized under "
            "transformers 5 (bitsandbytes replaces only exact nn.Linear/Conv1D layers; nn.Linear subclasses and "
            "fused MoE experts stay bf16 and are upcast to fp32)"
            for e in report.estimates if e.method == "qlora" and e.unquantized_linear_params]


def sharded_table(report: EstimateReport, width: int = 120) -> Table | None:
    """Per-GPU memory over several GPUs, when asked for."""
    rows = [e for e in report.estimates if e.sharded]
    if not rows:
        return None
    first = rows[0].sharded
    out = table(f"Per GPU over {first.gpus} GPUs on {first.nodes} node(s), {first.sharding}"
                + (f", offload {first.offload}" if first.offload != "none" else ""), "",
                *((e.method, "right") for e in rows), width=width)
    for label, key in (("weights (shard)", "weights_bytes"), ("gathered parameters", "gathered_bytes"),
                       ("gradients at the peak", "gradients_bytes"), ("optimizer states", "optimizer_bytes"),
                       ("communication buffers", "comm_buffer_bytes"), ("activations + transients", "other_bytes"),
                       ("peak allocated", "peak_allocated_bytes"), ("required per GPU", "required_bytes"),
                       ("host RAM per node: offloaded", "host_offload_bytes_per_node"),
                       ("host RAM per node: loading", "host_loading_bytes_per_node"),
                       ("checkpoint on disk per save", "checkpoint_bytes")):
        out.add_row(label, *(gib(getattr(e.sharded, key)) for e in rows))
    out.add_row("peak phase", *(e.sharded.peak_phase.split(" (")[0] for e in rows))
    return out


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


def published_where(sharding: str) -> str:
    """How published runs of a sharding are named: 'on one GPU', 'with fsdp'."""
    return "on one GPU" if sharding == "none" else f"with {sharding}"


def published_check_lines(report: EstimateReport) -> list[str]:
    """Per method: how far published GPU runs of it (the sharding they stand for) were from this memory model."""
    lines = []
    for e in report.estimates:
        if c := e.published_check:
            low, high = c.measured_over_estimated
            where = published_where(c.sharding)
            runs = f"{c.runs} published GPU run{'s' if c.runs > 1 else ''}"
            lines.append(f"{e.method} {where}: on {runs} ({', '.join(c.models)}; {', '.join(c.sources)}) the peak "
                         f"allocated memory was {low:.2f}-{high:.2f}x this model's estimate for them "
                         "(benchmarks/MEMORY-PUBLISHED.md)")
    return lines


def print_estimate(report: EstimateReport, console: Console) -> None:
    """The whole estimate: the model, the comparison, the bars, verdicts, instances, assumptions, prices."""
    m, width = report.model, console.width
    console.print(line((m.name, "bold"), f" ({m.hf_id or 'no HF id'}), {m.model_type}, {m.layers} layers, hidden "
                       f"{m.hidden_size}, vocab {m.vocab_size:,}; from {m.source}; counted {m.counting}"
                       + (f"; licence: {m.license}" if m.license else "")))
    console.print(comparison_table(report, width))
    console.print(bars(report))
    for text in selected_lines(report):
        console.print(text)
    if (instances := instances_table(report, width)) is not None:
        console.print(instances)
    for text in unplaced_lines(report):
        console.print(text)
    if (sharded := sharded_table(report, width)) is not None:
        console.print(sharded)
    for text in smallest_counts_line(report):
        console.print(line(text))
    for text in published_check_lines(report):
        console.print(line(text))
    console.print("Assumptions:", style="dim")
    for note in report.assumptions + quantization_notes(report):
        console.print(line(f"- {note}", style="dim"))
    dates = _price_dates(report)
    for source in sorted({f.price_source for e in report.estimates for f in e.cheapest_instances if f.price_source}):
        console.print(line(f"Prices: {source}" + (f" (dated {next(iter(dates))})" if len(dates) == 1 else ""),
                           style="dim"))


def measure_table(report, width: int = 120) -> Table:
    """Estimated against measured, term by term where both sides have the term."""
    est, got = report.estimated, report.measured
    out = table(line(f"{report.model.name} {report.setup.method} on {report.device}: estimate vs measured "
                     f"({report.steps} step(s) after warm-up)"), "", ("estimated", "right"), ("measured", "right"),
                width=width)
    out.add_row("weights (+ quantization state, buffers)", gib(est.weights_bytes + est.adapter_bytes),
                gib(got.weights_bytes))
    out.add_row("optimizer states", gib(est.optimizer_bytes + est.paged_optimizer_bytes), gib(got.optimizer_bytes))
    out.add_row("gradients (end of backward)", gib(est.gradients_bytes), gib(got.gradients_bytes))
    out.add_row("activations (end of forward)", gib(est.activations_bytes), gib(got.activations_bytes))
    out.add_row(Text("peak", style="bold"), gib(report.estimated_compared_bytes), gib(got.peak_allocated_bytes))
    for label, value in (("  tracker (live tensors)", got.peak_tracker_bytes),
                         ("  allocator (profiler)", got.peak_allocator_bytes),
                         ("  resident set (RSS)", got.peak_rss_bytes)):
        if value is not None:
            out.add_row(label, "", gib(value))
    out.add_row("error", f"{report.error_percent:+.1f}%", "")
    out.add_row("step time / throughput", "", f"{got.step_seconds:.2f} s, {got.tokens_per_second:,.0f} tokens/s")
    return out


def print_measure(report, console: Console) -> None:
    """The measured run against the estimate, and what the instruments say about each other."""
    console.print(measure_table(report, console.width))
    got = report.measured
    if got.instruments_disagree_percent is not None and got.instruments_disagree_percent > 2:
        console.print(line(f"- the CPU instruments disagree by {got.instruments_disagree_percent:.1f}% (over 2%): the "
                           "tracker misses what ops allocate inside themselves, which the allocator and RSS see; "
                           f"the peak was reached in {got.allocator_peak_at or 'an unnamed op'}", style="yellow"))
    if report.device == "cpu" and report.estimated.paged_optimizer_bytes:
        console.print("- paged optimizer states are counted in the peak on the CPU (no paged memory there)", style="dim")
    console.print("- activations measured include the loss; estimated excludes the loss's transient buffers", style="dim")
    if report.utilization is not None:
        predicted = report.predicted_tokens_per_second
        console.print(line(f"utilisation on {report.gpu}: {report.utilization:.0%} of the dense peak, "
                           f"{report.measured.tokens_per_second:,.0f} tokens/s (time model: {predicted:,.0f})"
                           + (f"; recorded in {report.calibration_file} for recommend" if report.calibration_file else
                              " (not recorded: --layers measures a cut-down model)")))
