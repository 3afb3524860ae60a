"""Rich rendering of recommendations and plans. Formats only; the numbers come from the core."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftplan.data.dataset import TokenBudget
from ftplan.plan import Plan
from ftplan.recommend.models import Candidate, Recommendation
from ftplan.render import explain as words
from ftplan.render.console import styled
from ftplan.render.estimate import gib
from ftplan.render.explain import hours

CHART_WIDTH, CHART_HEIGHT = 56, 12




def _settings(c: Candidate) -> str:
    s = c.setup
    parts = [s.optimizer.replace("adamw_torch_fused", "adamw").replace("paged_adamw_", "paged-")
             .replace("adamw_bnb_8bit", "adamw8"),
             "ckpt" if s.grad_ckpt else "no-ckpt"]
    if c.method != "full":
        parts.append(f"r{s.lora.r} {c.targets}")
    return " ".join(parts)


def candidates_table(rec: Recommendation, limit: int) -> Table:
    table = Table(title=f"Best plans for {rec.model} (priority {rec.request.priority}, task {rec.request.task})",
                  title_justify="left", pad_edge=False, box=None, header_style="bold")
    for col, justify in (("#", "right"), ("plan", "left"), ("mbxacc", "right"), ("settings", "left"),
                         ("GiB/GPU", "right"), ("time", "right"), ("cost", "right"), ("tier", "right")):
        table.add_column(col, justify=justify, no_wrap=col != "settings")
    for i, c in enumerate(rec.candidates[:limit], start=1):
        table.add_row(str(i), f"{c.method} {c.instance_count}x {c.instance_type}",
                      f"{c.setup.batch_size}x{c.grad_accum}",
                      _settings(c), f"{c.required_bytes / 2**30:.1f}/{c.gpu_memory_bytes / 2**30:.0f}",
                      hours(c.hours), f"${c.cost_usd:,.2f}", str(c.quality_tier),
                      style="bold green" if i == 1 else "")
    return table


def frontier_chart(rec: Recommendation) -> Text:
    """Cost against time on log axes: each frontier plan a letter, the recommended one '*'."""
    points = rec.frontier
    text = Text("Cost vs time frontier (log scales; nothing is both cheaper and faster than these)\n", style="bold")
    if len(points) < 2:
        return text.append("only one plan on the frontier\n")
    xs = [math.log(c.hours) for c in points]
    ys = [math.log(c.cost_usd) for c in points]
    span_x, span_y = (max(xs) - min(xs)) or 1, (max(ys) - min(ys)) or 1
    grid = [[" "] * CHART_WIDTH for _ in range(CHART_HEIGHT)]
    legend = []
    for i, c in enumerate(points):
        col = round((xs[i] - min(xs)) / span_x * (CHART_WIDTH - 1))
        row = CHART_HEIGHT - 1 - round((ys[i] - min(ys)) / span_y * (CHART_HEIGHT - 1))
        mark = "*" if c == rec.recommended else chr(ord("a") + i % 26)
        grid[row][col] = mark
        legend.append(f"{mark} {c.method} {c.instance_count} x {c.instance_type}: {hours(c.hours)}, ${c.cost_usd:,.2f}")
    top, bottom = f"${max(c.cost_usd for c in points):,.2f}", f"${min(c.cost_usd for c in points):,.2f}"
    pad = max(len(top), len(bottom))
    for r, line in enumerate(grid):
        label = top if r == 0 else bottom if r == CHART_HEIGHT - 1 else ""
        text.append(f"{label:>{pad}} |{''.join(line)}\n")
    text.append(" " * pad + " +" + "-" * CHART_WIDTH + "\n")
    left, right = hours(min(c.hours for c in points)), hours(max(c.hours for c in points))
    text.append(" " * (pad + 2) + left + " " * max(1, CHART_WIDTH - len(left) - len(right)) + right + "\n")
    for entry in legend:
        text.append(f"  {entry}\n", style="dim")
    return text


def data_lines(data: TokenBudget, micro_batch: int) -> list[str]:
    lines = [f"Data: {data.tokens:,} tokens per epoch, {data.examples:,} examples from {data.source} ({data.counting})"]
    if data.lengths:
        lg = data.lengths
        lines.append(f"  lengths: min {lg.min}, median {lg.p50}, p90 {lg.p90}, p99 {lg.p99}, max {lg.max} tokens; "
                     f"{data.truncated_examples} truncated to {data.seq_len}")
        packed = math.ceil(data.tokens / data.seq_len)
        if data.packing:
            lines.append(f"  packing: {packed:,} full sequences of {data.seq_len}")
        else:
            lines.append(f"  padding wastes {data.padding_waste(micro_batch):.0%} of the compute at micro-batch "
                         f"{micro_batch}; packing would train {packed:,} full sequences instead of {data.examples:,} "
                         "(--packing)")
    return lines


def print_recommendation(rec: Recommendation, console: Console, limit: int = 8) -> None:
    c = rec.recommended
    for line in data_lines(rec.data, c.setup.batch_size):
        console.print(line)
    console.print(candidates_table(rec, limit))
    console.print(frontier_chart(rec))
    console.print(styled(("Recommended:", "bold"), f" {c.method} on {c.instance_count} x {c.instance_type} "
                         f"({c.gpus_total} x {c.gpu}), {hours(c.hours)}, ", (f"${c.cost_usd:,.2f}", "bold")))
    for r in rec.reasons:
        console.print(f"  - {words.reason(r)}")
    for line in time_evidence_lines(rec):
        console.print(line)
    single = rec.best_single_instance
    if single is not None and single is not c and c.instance_count > 1:
        console.print(f"  Best on one instance: {single.method} on 1 x {single.instance_type}, {hours(single.hours)}, "
                      f"${single.cost_usd:,.2f}")
    if rec.why_not:
        console.print("Why not the others:", style="bold")
        for w in rec.why_not:
            console.print(f"  - {words.why_not(w)}")
    if rec.rejections:
        console.print(f"{rec.evaluated:,} combinations evaluated, {rec.kept:,} kept; dropped: " + ", ".join(
            f"{words.rejection(code)}: {n}" for code, n in sorted(rec.rejections.items(), key=lambda kv: -kv[1])),
            style="dim")
    console.print("Assumptions:", style="dim")
    for note in rec.assumptions:
        console.print(f"- {words.assumption(note)}", style="dim")
    if line := words.backend_line(rec.backend, rec.backend_reason):
        console.print(line)
    p = c.price
    console.print(f"Price: ${p.usd_per_hour:,.4f}/h {p.platform} {p.market} {p.region}, {p.source}, dated "
                  f"{p.date}{'; ' + p.derived if p.derived else ''}", style="dim")
    if p.warning:
        console.print(f"Warning: {p.warning}", style="yellow")


def time_evidence_lines(rec: Recommendation) -> list[str]:
    """How far the time model was off on the published runs nearest the plan; a caveat for small models."""
    ev = rec.time_evidence
    if ev is None or not ev.nearest:
        return []
    label = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
    runs = ", ".join(f"x{r.ratio:.2f} ({r.model} {label.get(r.method, r.method)}, {r.gpus} x {r.gpu}, {r.source})"
                     for r in ev.nearest)
    lines = [f"  Time model on the nearest published runs: {runs} [dim](predicted / measured step time; "
             "benchmarks/TIME-ACCURACY.md)[/]"]
    if ev.small_model_runs:
        small = ", ".join(f"x{r.ratio:.2f} ({r.model} {label.get(r.method, r.method)}, {r.gpus} x {r.gpu})"
                          for r in ev.small_model_runs)
        lines.append(f"  [yellow]Caveat: published runs of models of {ev.small_model_max_params / 1e9:g}B "
                     f"parameters or fewer ran slower than predicted ({small}); this time may be optimistic.[/]")
    return lines


def print_plan(plan: Plan, path: str, console: Console) -> None:
    t, h, e, m = plan.training, plan.hardware, plan.estimates, plan.model
    s = t.setup
    table = Table(title=f"Plan {path} (schema {plan.schema_version}, ftplan {plan.ftplan_version}, "
                        f"created {plan.created_at})", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", f"{m.name} ({m.hf_id or m.source}), {m.model_type}, config sha256 {m.config_sha256[:12]}")
    table.add_row("method", t.method + (f", LoRA r={s.lora.r} alpha={s.lora.alpha} dropout={s.lora.dropout} "
                                        f"targets={t.targets}" if s.lora else "")
                  + (f", {s.quant_type} {'double-quantized' if s.double_quant else ''}" if t.method == "qlora" else ""))
    table.add_row("precision", f"{s.precision}, optimizer {s.optimizer}, gradient checkpointing "
                               f"{'on' if s.grad_ckpt else 'off'}, attention {s.attention}")
    table.add_row("batch", f"micro-batch {s.batch_size} x {s.seq_len} tokens, accumulation {t.grad_accum}, "
                           f"global {t.global_batch} sequences")
    table.add_row("schedule", f"{t.epochs:g} epoch(s), {t.optimizer_steps:,} optimizer steps, lr {t.learning_rate:g} "
                              f"{t.lr_scheduler}, warmup {t.warmup_ratio:g}, max grad norm {t.max_grad_norm:g}, "
                              f"seed {t.seed}")
    table.add_row("data", f"{t.data_tokens:,} tokens from {t.data_source}, packing {'on' if t.packing else 'off'}")
    table.add_row("hardware", f"{h.instance_count} x {h.instance_type} ({h.gpus_per_instance} x {h.gpu} each), "
                              f"{h.platform} {h.market} {h.region}")
    table.add_row("memory", f"{gib(e.required_bytes_per_gpu)} of {gib(e.gpu_memory_bytes)} per GPU")
    table.add_row("time", f"{hours(e.hours)} billed ({hours(e.train_hours)} training), "
                          f"{e.tokens_per_second:,.0f} tokens/s at {e.utilization:.0%} utilisation")
    table.add_row("cost", f"${e.cost_usd:,.2f} at ${e.price.usd_per_hour:,.4f}/h ({e.price.source}, {e.price.date})")
    table.add_row("backend", plan.backend)
    console.print(table)
    console.print("Assumptions:", style="dim")
    for note in e.assumptions:
        console.print(f"- {words.assumption(note)}", style="dim")
