"""The training loop of the Hugging Face backend: accelerate for device and mixed precision, the
model built by planner.modelbuild (the code `ftplan measure` uses), checkpoints every N steps,
exact resume, and a clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from ftplan.api import (
    ModelSpec,
    Plan,
    PlannerError,
    ProgressCallback,
    ProgressEvent,
    RunRequest,
    RunResult,
    build_model,
    build_optimizer,
    uses_autocast,
)

from . import checkpoint, data


@contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a flag checked between optimizer steps, so a checkpoint gets saved."""
    flag = {"stop": None}

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        flag["stop"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def micro_batch_order(n: int, micro: int, seed: int, epoch: int) -> list[list[int]]:
    """The micro-batches of one epoch: a permutation fixed by (seed, epoch), so resume sees the same order."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [perm[i:i + micro] for i in range(0, n, micro)]


class Stream:
    """Micro-batches across epochs, addressable by position (resume skips straight to it)."""

    def __init__(self, examples, micro: int, seed: int, pad_id: int) -> None:
        self.examples, self.micro, self.seed, self.pad_id = examples, micro, seed, pad_id
        self.per_epoch = math.ceil(len(examples) / micro)
        self._epoch, self._order = -1, []

    def batch(self, position: int) -> dict:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, micro_batch_order(len(self.examples), self.micro, self.seed, epoch)
        return data.collate([self.examples[i] for i in self._order[index]], self.pad_id)


def mixed_precision(plan: Plan) -> str:
    """accelerate's mixed_precision for the plan: the Trainer's autocast, or none."""
    setup = plan.training.setup
    if not uses_autocast(setup):
        return "no"
    return "fp16" if setup.precision.startswith("fp16") else "bf16"


def _eval_loss(model, examples, micro: int, pad_id: int, accelerator) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), micro):
            batch = {k: v.to(accelerator.device) for k, v in data.collate(examples[i:i + micro], pad_id).items()}
            total += float(model(**batch).loss) * len(examples[i:i + micro])
            count += len(examples[i:i + micro])
    model.train()
    return total / count


def _save_final(model, tokenizer, output_dir: Path, full: bool) -> list[str]:
    """The adapter (or full model) and tokenizer, each written to a temporary name then renamed."""
    name = "model" if full else "adapter"
    written = []
    for target, save in ((name, lambda d: model.save_pretrained(d, safe_serialization=True)),
                         ("tokenizer", tokenizer.save_pretrained)):
        tmp = output_dir / f".{target}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(str(tmp))
        final = output_dir / target
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        written.append(target)
    return written


def train(plan: Plan, spec: ModelSpec, source: str, tokenizer, request: RunRequest,
          progress: ProgressCallback) -> RunResult:
    """Train `plan` from the weights at `source`; write outputs and checkpoints into request.output_dir."""
    import warnings

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ftplan shows its own progress
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6.*", category=FutureWarning)
    t = plan.training
    setup = t.setup
    out = request.output_dir
    cpu = request.device == "cpu" or (request.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=mixed_precision(plan), cpu=cpu)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(out)
    accelerator.wait_for_everyone()
    device = accelerator.device
    set_seed(t.seed)
    processes, rank = accelerator.num_processes, accelerator.process_index

    records = data.read_records(request.data)
    examples = data.tokenize(records, tokenizer, setup.seq_len, str(request.data))
    if t.packing:
        examples = data.pack(examples, setup.seq_len)
    eval_examples = None
    if request.eval_data is not None:
        eval_examples = data.tokenize(data.read_records(request.eval_data), tokenizer, setup.seq_len,
                                      str(request.eval_data))

    world = plan.hardware.instance_count * plan.hardware.gpus_per_instance
    if (t.grad_accum * world) % processes:
        raise PlannerError(f"{processes} processes cannot split the plan's global batch ({t.global_batch} = "
                           f"{setup.batch_size} x {t.grad_accum} x {world} GPUs); use a process count dividing "
                           f"{t.grad_accum * world}")
    # the same global batch on fewer processes than the plan's GPUs: accumulate longer
    accum = t.grad_accum * world // processes
    notes = [] if world == processes else [f"the plan spreads the global batch over {world} GPUs; this run used "
                                           f"{processes} process(es) with {accum} accumulation steps (same global "
                                           "batch)"]
    micro = setup.batch_size
    stream = Stream(examples, micro, t.seed, tokenizer.pad_token_id)
    steps_per_epoch = max(1, math.ceil(stream.per_epoch / (accum * processes)))
    total = request.max_steps or max(1, math.ceil(steps_per_epoch * t.epochs))

    model = build_model(spec, setup, device=str(device), pretrained=source, trust_remote_code=request.trust_remote_code,
                        sharded=processes > 1 and plan.hardware.sharding in ("fsdp", "fsdp-hybrid", "zero3"))
    optimizer = build_optimizer(model, setup)
    for group in optimizer.param_groups:
        group["lr"] = t.learning_rate
        group["initial_lr"] = t.learning_rate
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total),
                              num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)  # DDP (or FSDP) across processes
    scaler = getattr(accelerator, "scaler", None)
    full = t.method == "full"
    unwrapped = accelerator.unwrap_model(model)

    start_step, state = 0, {"tokens": 0, "first_loss": None, "elapsed": 0.0}
    resumed_from = None
    if request.resume:
        done = checkpoint.complete(out)
        if not done:
            raise PlannerError(f"--resume: no complete checkpoint in {out}; run without --resume to start over")
        state = checkpoint.load(done[-1], model=unwrapped, full=full, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, device=device)
        start_step = resumed_from = state["step"]

    params = [p for p in model.parameters() if p.requires_grad]
    if torch.cuda.is_available() and not cpu:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter() - state["elapsed"]
    loss_value, eval_loss, interrupted, step = None, None, False, start_step
    with stop_requests() as stop:
        for step in range(start_step + 1, total + 1):
            step_loss = torch.zeros((), device=device)
            step_tokens = torch.zeros((), device=device)
            for k in range(accum):
                # every process takes its own micro-batches: position (step, k) x processes + rank
                position = ((step - 1) * accum + k) * processes + rank
                batch = {key: v.to(device) for key, v in stream.batch(position).items()}
                with accelerator.autocast():
                    loss = model(**batch).loss / accum
                accelerator.backward(loss)
                step_loss += loss.detach().float()
                step_tokens += batch["input_ids"].numel()
            accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if processes > 1:
                step_loss = accelerator.reduce(step_loss, "mean")
                step_tokens = accelerator.reduce(step_tokens, "sum")
            step_loss = float(step_loss)
            state["tokens"] += int(step_tokens)
            loss_value = step_loss
            state["first_loss"] = state["first_loss"] if state["first_loss"] is not None else step_loss
            elapsed = time.perf_counter() - began
            state["elapsed"] = elapsed
            last = step == total
            if eval_examples is not None and last:
                eval_loss = _eval_loss(model, eval_examples, micro, tokenizer.pad_token_id, accelerator)
            if main and (step % request.log_every == 0 or last):
                rate = state["tokens"] / elapsed if elapsed else 0.0
                event = ProgressEvent(
                    step=step, total_steps=total, epoch=step / steps_per_epoch, loss=step_loss,
                    learning_rate=scheduler.get_last_lr()[0], tokens=state["tokens"], tokens_per_second=rate,
                    elapsed_seconds=elapsed, eta_seconds=elapsed / (step - start_step) * (total - step),
                    peak_memory_bytes=torch.cuda.max_memory_allocated() if not cpu else None, eval_loss=eval_loss)
                progress(event)
            if processes > 1:  # every process must stop at the same step, or the collectives hang
                flag = torch.tensor(1.0 if stop["stop"] else 0.0, device=device)
                if float(accelerator.reduce(flag, "sum")) > 0 and not stop["stop"]:
                    stop["stop"] = "a signal to another process"
            if stop["stop"] or (step % request.save_every == 0 and not last):
                accelerator.wait_for_everyone()
                if main:  # replicas are identical under DDP: one process writes
                    checkpoint.save(out, step, model=unwrapped, full=full, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, state=state)
                accelerator.wait_for_everyone()
            if stop["stop"]:
                interrupted = True
                notes.append(f"stopped by {stop['stop']} after step {step}; checkpoint saved")
                break
    artifacts: list[str] = []
    accelerator.wait_for_everyone()
    if not interrupted and main:
        artifacts += _save_final(unwrapped, tokenizer, out, full)
        for old in checkpoint.complete(out)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if processes > 1:
        notes.append(f"{processes} processes ({accelerator.distributed_type.value}); process 0 wrote the outputs")
    artifacts += [p.name for p in checkpoint.complete(out)]
    elapsed = time.perf_counter() - began
    return RunResult(
        output_dir=out, artifacts=artifacts, steps=step, total_steps=total, first_loss=state["first_loss"],
        final_loss=loss_value, eval_loss=eval_loss, tokens=state["tokens"], seconds=elapsed,
        tokens_per_second=state["tokens"] / elapsed if elapsed else 0.0,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if not cpu else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device="cpu" if cpu else "cuda", gpu_name=None if cpu else torch.cuda.get_device_name(0),
        interrupted=interrupted, resumed_from_step=resumed_from, notes=notes)
