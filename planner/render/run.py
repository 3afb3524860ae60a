"""Rich rendering for `ftplan run` and `ftplan plugins`."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from ftplan.render.console import line
from ftplan.render.estimate import gib
from ftplan.render.explain import hours
from ftplan.run.backend import ProgressEvent


def print_run_start(plan, backend, request, console: Console, data_notes: list[str] = ()) -> None:
    """The plan, backend, settings and data a run starts with, and how the data differ from the plan's."""
    t, h = plan.training, plan.hardware
    console.print(line(("Running", "bold"), f" {plan.model.name} {t.method} with backend '{backend.name}' "
                                               f"({backend.description})"))
    console.print(f"  micro-batch {t.setup.batch_size} x {t.setup.seq_len}, accumulation {t.grad_accum}, "
                  f"{t.setup.precision}{' (TF32)' if t.setup.tf32 else ''}, {t.setup.optimizer}, "
                  f"lr {t.learning_rate:g} {t.lr_scheduler}; "
                  f"planned for {h.instance_count} x {h.instance_type}")
    console.print(f"  data {request.data} -> {request.output_dir}"
                  + (" (resuming from the last checkpoint)" if request.resume else ""))
    for note in data_notes:
        console.print(line("  note: ", note, style="yellow"))


def remaining(seconds: float) -> str:
    """A duration: seconds below a minute (a tiny run's '0 min' said nothing), else as `hours` words it."""
    return f"{seconds:.0f} s" if seconds < 60 else hours(seconds / 3600)


@contextmanager
def progress_display(console: Console):
    """A progress bar with step, loss, tokens/s, time left, peak memory and time elapsed; yields the callback."""
    # every figure named; elapsed is the training's own clock (the summary's "in N s"), not the display's,
    # which would count loading the model too
    columns = (TextColumn("step {task.completed}/{task.total}", markup=False), BarColumn(),
               TextColumn("{task.fields[status]}", markup=False))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=None, status="starting")

        def show(event: ProgressEvent) -> None:
            memory = f", peak {gib(event.peak_memory_bytes)}" if event.peak_memory_bytes else ""
            status = (f"loss {event.loss:.4f}, {event.tokens_per_second:,.0f} tok/s, "
                      f"{remaining(event.eta_seconds)} left, {remaining(event.elapsed_seconds)} elapsed{memory}")
            progress.update(task, total=event.total_steps, completed=event.step, status=status)

        yield show


def print_summary(summary, console: Console) -> None:
    """The run's figures against the plan's, then its notes and outputs."""
    r = summary.result
    state = "interrupted" if r.interrupted else "finished"
    console.print(line((state, "bold"), f" after {r.steps} of {r.total_steps} steps in {r.seconds:,.1f} s on "
                         f"{r.device}" + (f" ({r.gpu_name})" if r.gpu_name else "")
                         + (f", resumed from step {r.resumed_from_step}" if r.resumed_from_step else "")))
    if r.first_loss is not None:
        console.print(f"  loss {r.first_loss:.4f} -> {r.final_loss:.4f}"
                      + (f", eval loss {r.eval_loss:.4f}" if r.eval_loss is not None else ""))
    gpus = summary.plan.hardware.instance_count * summary.plan.hardware.gpus_per_instance
    per_gpu = summary.estimated_tokens_per_second_per_gpu
    console.print(f"  {r.tokens:,} tokens, {r.tokens_per_second:,.0f} tokens/s (plan: {per_gpu * gpus:,.0f}"
                  + (f", {per_gpu:,.0f} per GPU)" if gpus > 1 else ")"))
    if summary.memory_error_percent is not None:
        console.print(f"  peak memory {gib(r.peak_memory_bytes)} measured vs "
                      f"{gib(summary.estimated_peak_allocated_bytes)}"
                      f" estimated ({summary.memory_error_percent:+.1f}%)")
    else:
        console.print(f"  CPU run: peak resident memory {gib(r.peak_rss_bytes or 0)} (the plan's GPU estimate of "
                      f"{gib(summary.estimated_peak_allocated_bytes)} is not comparable)")
    if r.wall_clock_seconds is not None or r.billed_usd is not None:
        wall = f"wall-clock {hours(r.wall_clock_seconds / 3600)}" if r.wall_clock_seconds is not None else ""
        billed = f"billed ~${r.billed_usd:,.2f}" if r.billed_usd is not None else ""
        console.print(f"  {', '.join(x for x in (wall, billed) if x)} (plan: {hours(summary.estimated_hours or 0)}, "
                      f"${summary.estimated_cost_usd or 0:,.2f})")
    if summary.calibration is not None:
        console.print(f"  recorded utilisation {summary.calibration.utilization:.0%} on {summary.calibration.gpu} "
                      "as calibration for later estimates")
    for note in r.notes:
        console.print(line("  ", (note, "dim")))
    console.print(f"  outputs in {r.output_dir}: {', '.join(r.artifacts)}")


def plugins_table(rows: list[dict], allowed: set[str] | None) -> Table:
    table = Table(title="Plugins" + (f" (FTPLAN_PLUGINS limits loading to: {', '.join(sorted(allowed)) or 'none'})"
                                     if allowed is not None else ""), title_justify="left")
    for col in ("plugin", "version", "source", "backends (methods; platforms)", "status"):
        table.add_column(col)
    for row in rows:
        backends = "\n".join(f"{b['name']} ({', '.join(b['methods'])}; {', '.join(b['platforms'])})"
                             for b in row["backends"]) or "-"
        if row["catalog_entries"]:
            backends += f"\n+{row['catalog_entries']} catalog entries"
        status = line(("; ".join(row["errors"]), "red")) if row["errors"] else "ok"
        table.add_row(row["name"], row["version"] or "-", row["source"], backends, status)
    return table
