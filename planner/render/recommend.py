"""Rich rendering of recommendations and plans. Formats only; the numbers come from the core.

Plans are files users edit and recommendations carry paths and plugin names: everything from them is shown
through render.console's line/plain (cleaned, never parsed as markup)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ftplan.data.dataset import TokenBudget
from ftplan.plan import Plan
from ftplan.recommend.models import Candidate, Recommendation
from ftplan.render import explain as words
from ftplan.render.console import is_narrow, line, plain, table
from ftplan.render.estimate import gib, published_where
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


def candidates_table(rec: Recommendation, limit: int, width: int = 120) -> Table:
    """The best plans; on a narrow terminal each plan's settings go on a second line under it."""
    narrow = is_narrow(width)
    out = table(line(f"Best plans for {rec.model} (priority {rec.request.priority}, task {rec.request.task})"),
                ("#", "right", True), ("plan", "left", not narrow), ("mb x acc", "right", True),
                *(() if narrow else ("settings",)), ("GiB/GPU", "right", True), ("time", "right", True),
                ("cost", "right", True), ("tier", "right", True), width=width, box=None, pad_edge=False,
                header_style="bold")
    for i, c in enumerate(rec.candidates[:limit], start=1):
        plan = line(f"{c.method} {c.instance_count}x {c.instance_type}")
        if narrow:
            plan.append("\n" + _settings(c), style="dim")
        out.add_row(str(i), plan, f"{c.setup.batch_size}x{c.grad_accum}", *(() if narrow else (plain(_settings(c)),)),
                    f"{c.required_bytes / 2**30:.1f}/{c.gpu_memory_bytes / 2**30:.0f}", hours(c.hours),
                    f"${c.cost_usd:,.2f}", str(c.quality_tier), style="bold green" if i == 1 else "")
    return out


def _axis(low: str, high: str, width: int) -> str:
    """The labels under an axis: both ends, or one when they read the same (candidates that tie)."""
    if low == high:
        return low.center(width).rstrip()
    return low + " " * max(1, width - len(low) - len(high)) + high


def frontier_chart(rec: Recommendation) -> Text:
    """Cost against time on log axes: each frontier plan a letter, the recommended one '*'. Where plans tie
    on an axis they share its one label, and plans on the same spot share it (the legend names them all)."""
    points = rec.frontier
    text = Text("Cost vs time frontier (log scales; nothing is both cheaper and faster than these)\n", style="bold")
    if len(points) < 2:
        return text.append("only one plan on the frontier\n")
    xs = [math.log(c.hours) for c in points]
    ys = [math.log(c.cost_usd) for c in points]
    span_x, span_y = max(xs) - min(xs), max(ys) - min(ys)
    grid = [[" "] * CHART_WIDTH for _ in range(CHART_HEIGHT)]
    legend = []
    for i, c in enumerate(points):
        col = round((xs[i] - min(xs)) / span_x * (CHART_WIDTH - 1)) if span_x else CHART_WIDTH // 2
        row = CHART_HEIGHT - 1 - round((ys[i] - min(ys)) / span_y * (CHART_HEIGHT - 1)) if span_y else \
            CHART_HEIGHT // 2
        mark = "*" if c == rec.recommended else chr(ord("a") + i % 26)
        grid[row][col] = mark if grid[row][col] in (" ", mark) or mark == "*" else grid[row][col]
        legend.append(f"{mark} {c.method} {c.instance_count} x {c.instance_type}: {hours(c.hours)}, ${c.cost_usd:,.2f}")
    top, bottom = f"${max(c.cost_usd for c in points):,.2f}", f"${min(c.cost_usd for c in points):,.2f}"
    pad = max(len(top), len(bottom))
    for r, cells in enumerate(grid):
        if top == bottom:
            label = top if r == CHART_HEIGHT // 2 else ""
        else:
            label = top if r == 0 else bottom if r == CHART_HEIGHT - 1 else ""
        text.append(f"{label:>{pad}} |{''.join(cells)}\n")
    text.append(" " * pad + " +" + "-" * CHART_WIDTH + "\n")
    left, right = hours(min(c.hours for c in points)), hours(max(c.hours for c in points))
    text.append(" " * (pad + 2) + _axis(left, right, CHART_WIDTH) + "\n")
    for entry in legend:
        text.append(f"  {entry}\n", style="dim")
    return text


def data_lines(data: TokenBudget, micro_batch: int) -> list[Text]:
    """Where the tokens come from, their length distribution, truncation and padding."""
    lines = [line(f"Data: {data.tokens:,} tokens per epoch, {data.examples:,} examples from {data.source} "
                  f"({data.counting})")]
    if data.lengths:
        lg = data.lengths
        lines.append(line(f"  lengths: min {lg.min}, median {lg.p50}, p90 {lg.p90}, p99 {lg.p99}, max {lg.max} tokens; "
                          f"{data.truncated_examples} truncated to {data.seq_len}"
                          + (f", {data.dropped_examples} left out (nothing to learn once truncated)"
                             if data.dropped_examples else "")))
        packed = math.ceil(data.tokens / data.seq_len)
        if data.packing:
            lines.append(line(f"  packing: {packed:,} full sequences of {data.seq_len}"))
        else:
            lines.append(line(f"  padding wastes {data.padding_waste(micro_batch):.0%} of the compute at micro-batch "
                              f"{micro_batch}; packing would train {packed:,} full sequences instead of "
                              f"{data.examples:,} (--packing)"))
    return lines


def _explanation_lines(rec: Recommendation) -> list[Text | str]:
    """Reasons, the best single instance, why not the other methods, what was dropped."""
    c, out = rec.recommended, []
    out += [line(f"  - {words.reason(r)}") for r in rec.reasons]
    single = rec.best_single_instance
    if single is not None and single is not c and c.instance_count > 1:
        out.append(line(f"  Best on one instance: {single.method} on 1 x {single.instance_type}, "
                        f"{hours(single.hours)}, ${single.cost_usd:,.2f}"))
    if rec.why_not:
        out.append(line(("Why not the others:", "bold")))
        out += [line(f"  - {words.why_not(w)}") for w in rec.why_not]
    if rec.rejections:
        out.append(line(f"{rec.evaluated:,} combinations evaluated, {rec.kept:,} kept; dropped: " + ", ".join(
            f"{words.rejection(code)}: {n}" for code, n in sorted(rec.rejections.items(), key=lambda kv: -kv[1])),
            style="dim"))
    return out


def print_recommendation(rec: Recommendation, console: Console, limit: int = 8) -> None:
    """Data, the best plans, the frontier, the recommendation and why, assumptions, backend and price."""
    c = rec.recommended
    for text in data_lines(rec.data, c.setup.batch_size):
        console.print(text)
    console.print(candidates_table(rec, limit, console.width))
    console.print(frontier_chart(rec))
    console.print(line(("Recommended:", "bold"), f" {c.method} on {c.instance_count} x {c.instance_type} "
                       f"({c.gpus_total} x {c.gpu}), {hours(c.hours)}, ", (f"${c.cost_usd:,.2f}", "bold")))
    for text in _explanation_lines(rec):
        console.print(text)
    for text in time_evidence_lines(rec) + memory_evidence_lines(rec):
        console.print(text)
    console.print("Assumptions:", style="dim")
    for note in rec.assumptions:
        console.print(line(f"- {words.assumption(note)}", style="dim"))
    if text := words.backend_line(rec.backend, rec.backend_reason):
        console.print(line(text))
    p = c.price
    console.print(line(f"Price: ${p.usd_per_hour:,.4f}/h {p.platform} {p.market} {p.region}, {p.source}, dated "
                       f"{p.date}{'; ' + p.derived if p.derived else ''}", style="dim"))
    if p.warning:
        console.print(line(f"Warning: {p.warning}", style="yellow"))


def time_evidence_lines(rec: Recommendation) -> list[Text]:
    """How far the time model was off on the published runs nearest the plan; caveats for small models, long
    sequences and fp32 MoE experts."""
    ev = rec.time_evidence
    if ev is None or not ev.nearest:
        return []
    label = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}
    runs = ", ".join(f"x{r.ratio:.2f} ({r.model} {label.get(r.method, r.method)}, {r.gpus} x {r.gpu}, {r.source})"
                     for r in ev.nearest)
    lines = [line(f"  Time model on the nearest published runs: {runs} ",
                  ("(predicted / measured step time; benchmarks/TIME-ACCURACY.md)", "dim"))]
    if small := ev.small_model_runs:
        worst = _furthest(small)
        lines.append(_range_caveat(small, f"of models of {ev.small_model_max_params / 1e9:g}B parameters or fewer",
                                   f"{worst.model} {label.get(worst.method, worst.method)}, {worst.gpus} x "
                                   f"{worst.gpu}", "this time may be off by as much."))
    if long := ev.long_context_runs:
        worst = _furthest(long)
        lines.append(_range_caveat(long, f"with sequences of {ev.long_context_min_seq_len:,} tokens or more",
                                   f"{worst.model}, {worst.seq_len:,.0f} tokens, {worst.gpus} x {worst.gpu}",
                                   "no published run this long used today's attention kernels."))
    if ev.fp32_expert_share:
        lines.append(line(f"  Caveat: {ev.fp32_expert_share:.0%} of this plan's matmul FLOPs are MoE experts that "
                          "compute in fp32 (transformers' grouped_mm ignores autocast); the time counts them at the "
                          "half-precision rate and no published MoE run checks it: it may be several times too "
                          "short.", style="yellow"))
    return lines


def memory_evidence_lines(rec: Recommendation) -> list[Text]:
    """How the peak memory of published GPU runs of the plan's method and sharding compared with the memory model,
    and whether the plan still fits at the highest of those ratios."""
    c, check = rec.recommended, rec.memory_evidence
    if check is None:
        return []
    low, high = check.measured_over_estimated
    where = published_where(check.sharding)
    runs = f"{check.runs} run{'s' if check.runs > 1 else ''}: {', '.join(check.models)}, {', '.join(check.sources)}"
    lines = [line(f"  Memory model on published GPU runs of {c.method} {where}: peak allocated {low:.2f}-{high:.2f}x "
                  f"the estimate ", (f"({runs}; benchmarks/MEMORY-PUBLISHED.md)", "dim"))]
    at_high = rec.required_at_published_high_bytes
    if at_high and at_high > c.gpu_memory_bytes:
        lines.append(line(f"  Caveat: at {high:.2f}x this plan would need {gib(at_high)} of the GPU's "
                          f"{gib(c.gpu_memory_bytes)}; leave more headroom (a smaller micro-batch, or more GPUs).",
                          style="yellow"))
    return lines


def _furthest(runs: list):
    """The run the time model missed most, either way (its ratio furthest from 1 in log)."""
    return max(runs, key=lambda r: abs(math.log(r.ratio)))


def _range_caveat(runs: list, which: str, furthest: str, then: str) -> Text:
    """A caveat line: the time model's ratios on the published runs `which` describes (sorted by ratio; below 1
    a run was slower than predicted), the one furthest off named."""
    return line(f"  Caveat: on {len(runs)} published runs {which} the time model read x{runs[0].ratio:.2f}-"
                f"x{runs[-1].ratio:.2f} of the measured step (furthest off: {furthest}); {then}", style="yellow")


def _plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """(label, value) for each part of a plan, in words."""
    t, h, e, m = plan.training, plan.hardware, plan.estimates, plan.model
    s = t.setup
    return [
        ("model", f"{m.name} ({m.hf_id or m.source}), {m.model_type}, config sha256 {m.config_sha256[:12]}"),
        ("method", t.method + (f", LoRA r={s.lora.r} alpha={s.lora.alpha} dropout={s.lora.dropout} "
                               f"targets={t.targets}" if s.lora else "")
         + (f", {s.quant_type}{' double-quantized' if s.double_quant else ''}" if t.method == "qlora" else "")),
        ("precision", f"{s.precision}{' with TF32 matmuls' if s.tf32 else ''}, optimizer {s.optimizer}, "
                      "gradient checkpointing "
                      f"{'on' if s.grad_ckpt else 'off'}, attention {s.attention}"),
        ("batch", f"micro-batch {s.batch_size} x {s.seq_len} tokens, accumulation {t.grad_accum}, "
                  f"global {t.global_batch} sequences"
                  + (", gradients reduce-scattered every micro-batch (sync_each_batch)" if s.sync_each_batch else "")),
        ("schedule", f"{t.epochs:g} epoch(s), {t.optimizer_steps:,} optimizer steps, lr {t.learning_rate:g} "
                     f"{t.lr_scheduler}, warmup {t.warmup_ratio:g}, max grad norm {t.max_grad_norm:g}, seed {t.seed}"),
        ("data", f"{t.data_tokens:,} tokens from {t.data_source}, packing {'on' if t.packing else 'off'}"),
        ("hardware", f"{h.instance_count} x {h.instance_type} ({h.gpus_per_instance} x {h.gpu} each), "
                     f"{h.platform} {h.market} {h.region}"),
        ("memory", f"{gib(e.required_bytes_per_gpu)} of {gib(e.gpu_memory_bytes)} per GPU"),
        ("time", f"{hours(e.hours)} billed ({hours(e.train_hours)} training), "
                 f"{e.tokens_per_second:,.0f} tokens/s at {e.utilization:.0%} utilisation"),
        ("cost", f"${e.cost_usd:,.2f} at ${e.price.usd_per_hour:,.4f}/h ({e.price.source}, {e.price.date})"),
        ("backend", plan.backend),
    ]


def print_plan(plan: Plan, path: str, console: Console) -> None:
    """An accepted plan, every value as written in the file (shown as data)."""
    out = table(line(f"Plan {path} (schema {plan.schema_version}, ftplan {plan.ftplan_version}, created "
                     f"{plan.created_at})"), ("", "left", True), "", width=console.width, show_header=False)
    for label, value in _plan_rows(plan):
        out.add_row(Text(label, style="bold"), plain(value))
    console.print(out)
    console.print("Assumptions:", style="dim")
    for note in plan.estimates.assumptions:
        console.print(line(f"- {words.assumption(note)}", style="dim"))
