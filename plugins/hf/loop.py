"""The training loop of the Hugging Face backend: accelerate for device and mixed precision, the model built
by ftplan.api.build_model (the code `ftplan measure` uses), checkpoints every N steps, exact resume from the
newest intact checkpoint, and a clean stop on SIGINT/SIGTERM or a loss that is no longer finite.

`train` runs the stages in order: start (accelerator, seed), data, build (model, optimizer, schedule),
resume, the steps, finish (final save, result)."""

from __future__ import annotations

import math
import os
import resource
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
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

from . import checkpoint, data, fingerprint, zero
from .quiet import no_save_bar


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


def epoch_order(n: int, seed: int, epoch: int):
    """The order of one epoch's examples: a permutation fixed by (seed, epoch), so resume sees the same order. A
    tensor (8 bytes an example): a million examples as Python lists of micro-batches cost 100 MB."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


class Stream:
    """Micro-batches across epochs, addressable by position (resume skips straight to it)."""

    def __init__(self, examples, micro: int, seed: int, pad_id: int) -> None:
        self.examples, self.micro, self.seed, self.pad_id = examples, micro, seed, pad_id
        self.per_epoch = math.ceil(len(examples) / micro)
        self._epoch, self._order = -1, None

    def batch(self, position: int) -> dict:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(len(self.examples), self.seed, epoch)
        indices = self._order[index * self.micro:(index + 1) * self.micro].tolist()
        return data.collate(self.examples.take(indices), self.pad_id)


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
            rows = examples.take(list(range(i, min(i + micro, len(examples)))))
            batch = {k: v.to(accelerator.device) for k, v in data.collate(rows, pad_id).items()}
            total += float(model(**batch).loss) * len(rows)
            count += len(rows)
    model.train()
    return total / count


def _save_final(model, tokenizer, output_dir: Path, full: bool, procs: checkpoint.Processes) -> list[str]:
    """The adapter (or full model) with the tokenizer beside it - so AutoTokenizer, AutoPeftModelForCausalLM and
    pipeline() load the folder as it is - written to a temporary name, then renamed. Every process calls it:
    under FSDP and ZeRO-3 the weights are gathered first."""
    state_dict = None
    if zero.partitioned(model):
        state_dict = zero.model_state(model, full, procs.main)
    elif procs.count > 1 and checkpoint.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    name = "model" if full else "adapter"
    if procs.main:
        tmp = output_dir / f".{name}.tmp"
        checkpoint.clear(tmp)  # a link there is unlinked, never written through
        tmp.mkdir()
        with no_save_bar():
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        final = output_dir / name
        checkpoint.clear(final)
        os.replace(tmp, final)
    procs.barrier()
    return [name]


@dataclass
class Session:
    """What the stages of one run share."""

    plan: Plan
    request: RunRequest
    accelerator: object
    procs: checkpoint.Processes
    cpu: bool
    notes: list[str] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)
    stream: Stream | None = None
    eval_examples: data.Examples | None = None
    accum: int = 1
    steps_per_epoch: int = 1
    total: int = 1
    model: object = None
    unwrapped: object = None
    optimizer: object = None
    scheduler: object = None
    scaler: object = None

    @property
    def full(self) -> bool:
        return self.plan.training.method == "full"

    @property
    def device(self):
        return self.accelerator.device


def _gather_objects(obj) -> list:
    """Every process's `obj` in rank order (one process: just its own)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _start(plan: Plan, request: RunRequest) -> Session:
    """The accelerator (device, mixed precision, processes) and the seed; stale temporary checkpoints go."""
    from .quiet import quiet_libraries

    quiet_libraries()  # before torch, transformers and bitsandbytes load: their first messages are the noisy ones
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ftplan shows its own progress
    cpu = request.device == "cpu" or (request.device == "auto" and not torch.cuda.is_available())
    deepspeed_on_cpu = cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"  # launch.command() set it
    if deepspeed_on_cpu:  # accelerate starts DeepSpeed only off its CPU path, and then needs the backend named
        from accelerate import PartialState

        PartialState(backend="gloo")
    accelerator = Accelerator(mixed_precision=mixed_precision(plan), cpu=cpu and not deepspeed_on_cpu)
    procs = checkpoint.Processes(rank=accelerator.process_index, count=accelerator.num_processes,
                                 barrier=accelerator.wait_for_everyone, gather=_gather_objects)
    if procs.main:
        request.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(request.output_dir)
    procs.barrier()
    set_seed(plan.training.seed)
    return Session(plan=plan, request=request, accelerator=accelerator, procs=procs, cpu=cpu,
                   fingerprint=fingerprint.of(plan, request))


def accumulation(plan: Plan, processes: int) -> int | None:
    """Micro-batches each of `processes` processes accumulates per optimizer step to keep the plan's global batch:
    the plan's accumulation x GPUs split among them (fewer processes than GPUs accumulate longer); None when they
    cannot split it evenly."""
    hw = plan.hardware
    total = plan.training.grad_accum * hw.instance_count * hw.gpus_per_instance
    return None if total % processes else total // processes


def _data(s: Session, tokenizer) -> None:
    """Tokenized examples as a stream of micro-batches, the accumulation that keeps the plan's global batch on
    this many processes, and the step count."""
    t, setup, request = s.plan.training, s.plan.training.setup, s.request
    examples = data.Examples(request.data, tokenizer, setup.seq_len)
    if t.packing:
        examples = data.Packed(examples, setup.seq_len)
    if request.eval_data is not None:
        s.eval_examples = data.Examples(request.eval_data, tokenizer, setup.seq_len)
    world, processes = s.plan.hardware.instance_count * s.plan.hardware.gpus_per_instance, s.procs.count
    accum = accumulation(s.plan, processes)
    if accum is None:
        raise PlannerError(f"{processes} processes cannot split the plan's global batch ({t.global_batch} = "
                           f"{setup.batch_size} x {t.grad_accum} x {world} GPUs); use a process count dividing "
                           f"{t.grad_accum * world}")
    s.accum = accum
    if world != processes:
        s.notes.append(f"the plan spreads the global batch over {world} GPUs; this run used {processes} process(es) "
                       f"with {s.accum} accumulation steps (same global batch)")
    s.stream = Stream(examples, setup.batch_size, t.seed, tokenizer.pad_token_id)
    s.steps_per_epoch = max(1, math.ceil(s.stream.per_epoch / (s.accum * processes)))
    s.total = request.max_steps or max(1, math.ceil(s.steps_per_epoch * t.epochs))


def _build(s: Session, spec: ModelSpec, source: str) -> None:
    """Model with the method applied, optimizer, learning-rate schedule, all prepared by accelerate."""
    from transformers import get_scheduler

    t = s.plan.training
    model = build_model(spec, t.setup, device=str(s.device), pretrained=source,
                        trust_remote_code=s.request.trust_remote_code,
                        sharded=s.procs.count > 1 and s.plan.hardware.sharding in ("fsdp", "fsdp-hybrid", "zero3"))
    optimizer = build_optimizer(model, t.setup)
    for group in optimizer.param_groups:
        group["lr"] = t.learning_rate
        group["initial_lr"] = t.learning_rate
    s.scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * s.total),
                                num_training_steps=s.total)
    s.model, s.optimizer = s.accelerator.prepare(model, optimizer)  # DDP (or FSDP) across processes
    s.scaler = getattr(s.accelerator, "scaler", None)
    s.unwrapped = s.accelerator.unwrap_model(s.model)


def _resume(s: Session) -> tuple[dict, int | None]:
    """The trainer state to start from: fresh, or the newest intact checkpoint's (older ones when newer ones are
    damaged or do not load, each skip said in the notes) - refused when it is another run's."""
    state = {"tokens": 0, "first_loss": None, "elapsed": 0.0, "step": 0, "fingerprint": s.fingerprint,
             "total_steps": s.total}
    if not s.request.resume:
        return state, None
    path, skipped = checkpoint.newest_intact(s.request.output_dir)
    s.notes += skipped
    while path is not None:
        _check_same_run(s, path, checkpoint.read_state(path))
        try:
            state = checkpoint.load(path, model=s.unwrapped, full=s.full, optimizer=s.optimizer,
                                    scheduler=s.scheduler, scaler=s.scaler, device=s.device, procs=s.procs)
            return {**state, "fingerprint": s.fingerprint, "total_steps": s.total}, state["step"]
        except (ValueError, KeyError, OSError) as exc:
            s.notes.append(f"{path.name} cannot be resumed ({exc}); skipped")
            older = [p for p in checkpoint.complete(s.request.output_dir) if p.name < path.name]
            path = next((p for p in reversed(older) if not checkpoint.damage(p)), None)
    raise PlannerError(f"--resume: no intact checkpoint in {s.request.output_dir} loads into this plan's model ("
                       + "; ".join(s.notes[-2:]) + "); run without --resume to start over")


def _check_same_run(s: Session, path, saved: dict) -> None:
    """Before anything loads: the checkpoint must be this run's - same data, plan and method, and a step within
    the same number of steps (the learning-rate schedule depends on it)."""
    differs = fingerprint.difference(saved.get("fingerprint"), s.fingerprint)
    step, total = saved.get("step"), saved.get("total_steps", s.total)
    if not differs and isinstance(step, int) and step > s.total:
        differs = f"is at step {step}, beyond this run's {s.total} steps"
    elif not differs and total != s.total:
        differs = f"belongs to a run of {total} steps, this one has {s.total} (--max-steps or the data changed)"
    if differs:
        raise PlannerError(f"--resume: {path.name} {differs}; resume with the checkpoint's plan, data and "
                           "--max-steps, or start a new run")


def _reduces_every_micro_step(s: Session) -> bool:
    """Whether gradients are reduced after every micro-step: with one process or one micro-step there is nothing
    to skip, DeepSpeed reduces as it configures, and a plan may say sync_each_batch; otherwise DDP and FSDP skip
    the reduction, as the Trainer does, on every micro-step but an optimizer step's last (under FSDP that holds
    each gradient unsharded until then; ftplan's estimate models both)."""
    from accelerate.utils import DistributedType

    return s.procs.count == 1 or s.accum == 1 or s.plan.training.setup.sync_each_batch \
        or s.accelerator.distributed_type == DistributedType.DEEPSPEED


def _sync_context(s: Session, last: bool):
    """accelerate's no_sync for a micro-step whose gradient reduction is skipped, else nothing."""
    return nullcontext() if last or _reduces_every_micro_step(s) else s.accelerator.no_sync(s.model)


def _reduction_note(s: Session) -> str:
    if s.accum == 1:
        return ""
    if _reduces_every_micro_step(s):
        return "; gradients reduced every micro-batch"
    return (f"; gradients reduced once per optimizer step (no_sync over the first {s.accum - 1} of its {s.accum} "
            "micro-batches, as the Trainer)")


def _micro_step(s: Session, position: int) -> tuple:
    """Forward and backward of one micro-batch; (loss, real tokens) as tensors."""
    from accelerate.utils import DistributedType

    batch = {key: v.to(s.device) for key, v in s.stream.batch(position).items()}
    with s.accelerator.autocast():
        loss = s.model(**batch).loss
    # DeepSpeed divides by its own gradient_accumulation_steps (launch.deepspeed_config sets it to s.accum)
    deepspeed = s.accelerator.distributed_type == DistributedType.DEEPSPEED
    s.accelerator.backward(loss if deepspeed else loss / s.accum)
    return (loss / s.accum).detach().float(), batch["attention_mask"].sum()


def _steps(s: Session, state: dict, tokenizer, progress: ProgressCallback) -> tuple[int, float | None, bool]:
    """The optimizer steps from the state's step to the last; returns (last step, eval loss, interrupted)."""
    import torch

    acc, procs, t = s.accelerator, s.procs, s.plan.training
    params = [p for p in s.model.parameters() if p.requires_grad]
    if torch.cuda.is_available() and not s.cpu:
        torch.cuda.reset_peak_memory_stats()
    start, began = state["step"], time.perf_counter() - state["elapsed"]
    step, eval_loss = start, None
    with stop_requests() as stop:
        for step in range(start + 1, s.total + 1):
            step_loss, step_tokens = torch.zeros((), device=s.device), torch.zeros((), device=s.device)
            for k in range(s.accum):  # every process takes its own micro-batches: (step, k) x processes + rank
                # accumulate(): DeepSpeed steps on accelerate's boundary, every s.accum micro-steps (elsewhere
                # accelerate's own accumulation is 1); _sync_context: the Trainer's no_sync before the last
                with acc.accumulate(s.model), _sync_context(s, last=k == s.accum - 1):
                    loss, tokens = _micro_step(s, ((step - 1) * s.accum + k) * procs.count + procs.rank)
                step_loss, step_tokens = step_loss + loss, step_tokens + tokens
            acc.clip_grad_norm_(params, t.max_grad_norm)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            if procs.count > 1:
                step_loss, step_tokens = acc.reduce(step_loss, "mean"), acc.reduce(step_tokens, "sum")
            state["loss"] = float(step_loss)
            state["tokens"] += int(step_tokens)
            state["first_loss"] = state["loss"] if state["first_loss"] is None else state["first_loss"]
            state["elapsed"] = time.perf_counter() - began
            last = step == s.total
            if s.eval_examples is not None and last:
                eval_loss = _eval_loss(s.model, s.eval_examples, t.setup.batch_size, tokenizer.pad_token_id, acc)
            if procs.main and (step % s.request.log_every == 0 or last):
                progress(_event(s, state, step, start, eval_loss))
            if not math.isfinite(state["loss"]):  # the same on every process: the loss was reduced
                raise PlannerError(f"the loss became {state['loss']} at step {step}; training stopped without saving "
                                   f"a checkpoint of diverged weights - lower training.learning_rate "
                                   f"({t.learning_rate:g}) or check the data")
            _agree_to_stop(s, stop)
            if stop["stop"] or (step % s.request.save_every == 0 and not last):
                checkpoint.save(s.request.output_dir, step, model=s.unwrapped, full=s.full, optimizer=s.optimizer,
                                scheduler=s.scheduler, scaler=s.scaler, state=state, procs=procs)
            if stop["stop"]:
                s.notes.append(f"stopped by {stop['stop']} after step {step}; checkpoint saved")
                return step, eval_loss, True
    return step, eval_loss, False


def _agree_to_stop(s: Session, stop: dict) -> None:
    """Every process must stop at the same step, or the collectives hang: a signal to one stops all."""
    if s.procs.count > 1:
        import torch

        flag = torch.tensor(1.0 if stop["stop"] else 0.0, device=s.device)
        if float(s.accelerator.reduce(flag, "sum")) > 0 and not stop["stop"]:
            stop["stop"] = "a signal to another process"


def _event(s: Session, state: dict, step: int, start: int, eval_loss: float | None) -> ProgressEvent:
    import torch

    elapsed = state["elapsed"]
    return ProgressEvent(
        step=step, total_steps=s.total, epoch=step / s.steps_per_epoch, loss=state["loss"],
        learning_rate=s.scheduler.get_last_lr()[0], tokens=state["tokens"],
        tokens_per_second=state["tokens"] / elapsed if elapsed else 0.0, elapsed_seconds=elapsed,
        eta_seconds=elapsed / max(1, step - start) * (s.total - step),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if not s.cpu else None, eval_loss=eval_loss)


def train(plan: Plan, spec: ModelSpec, source: str, tokenizer, request: RunRequest,
          progress: ProgressCallback) -> RunResult:
    """Train `plan` from the weights at `source`; write outputs and checkpoints into request.output_dir."""
    s = _start(plan, request)
    _data(s, tokenizer)
    _build(s, spec, source)
    state, resumed_from = _resume(s)
    step, eval_loss, interrupted = _steps(s, state, tokenizer, progress)
    return _finish(s, tokenizer, state, step, eval_loss, interrupted, resumed_from)


def _finish(s: Session, tokenizer, state: dict, step: int, eval_loss: float | None, interrupted: bool,
            resumed_from: int | None) -> RunResult:
    """The final adapter or model (unless interrupted), and the result."""
    import torch

    out = s.request.output_dir
    artifacts = [] if interrupted else _save_final(s.unwrapped, tokenizer, out, s.full, s.procs)
    if s.procs.count > 1:
        s.notes.append(f"{s.procs.count} processes ({s.accelerator.distributed_type.value})"
                       + ("; weights gathered from their shards for saving" if checkpoint.is_sharded(s.model) else
                          "; process 0 wrote the weights, every process its RNG state")
                       + _reduction_note(s))
    artifacts += [p.name for p in checkpoint.complete(out)]
    elapsed = state["elapsed"]
    return RunResult(
        output_dir=out, artifacts=artifacts, steps=step, total_steps=s.total, first_loss=state["first_loss"],
        final_loss=state.get("loss"), eval_loss=eval_loss, tokens=state["tokens"], seconds=elapsed,
        tokens_per_second=state["tokens"] / elapsed if elapsed else 0.0,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if not s.cpu else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device="cpu" if s.cpu else "cuda", gpu_name=None if s.cpu else torch.cuda.get_device_name(0),
        interrupted=interrupted, resumed_from_step=resumed_from, notes=s.notes)
