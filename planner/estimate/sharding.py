"""Per-GPU memory when training is spread over several GPUs: DDP, DeepSpeed ZeRO 1-3, FSDP.

Starts from the single-GPU breakdown (memory.py) and divides what each scheme shards:

| scheme      | weights        | gradients | optimizer states |
|-------------|----------------|-----------|------------------|
| none, ddp   | replicated     | replicated| replicated       |
| zero1       | replicated     | replicated| / N              |
| zero2       | replicated     | / N       | / N              |
| zero3, fsdp | / N + gathered | / N (*)   | / N              |
| fsdp-hybrid | / GPUs per node + gathered, replicated across nodes  |

(*) FSDP with gradient accumulation as the Trainer runs it (no_sync): whole, in bf16, until the last micro-batch;
/ N with sync_each_batch. FSDP's root unit (embeddings, final norm, head) reduce-scatters last: its gradients
are whole until then and its reduce-scatter buffers make the end of backward; the forward's start holds the
root's and the first layer's all-gather outputs beside the weights copied out of them.

Full fine-tuning under ZeRO is DeepSpeed's: weights and gradients in the compute dtype (no autocast), fp32
master weights with the optimizer's states on flat partitions. Activations are per GPU in data parallelism
and do not shrink. Offloading moves optimizer states (ZeRO) or parameters with their states (ZeRO-3, FSDP)
to host RAM, reported per node.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ftplan.errors import PlannerError
from ftplan.estimate import deepspeed as ds
from ftplan.estimate.memory import (
    END_OF_BACKWARD,
    END_OF_FORWARD,
    FIRST_LAYER,
    LAST_LAYER,
    OPTIMIZER_STEP,
    MemoryBreakdown,
    estimate_memory,
    gradient_bytes,
    outside_allocator,
    qlora_group_bytes,
)
from ftplan.estimate.optimizer import Device
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import ModelLayout

Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp-hybrid"]
Offload = Literal["none", "optimizer", "params"]
SHARDINGS: tuple[str, ...] = Sharding.__args__  # type: ignore[attr-defined]
OFFLOADS: tuple[str, ...] = Offload.__args__  # type: ignore[attr-defined]
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP bucket_cap_mb default; two buckets in flight
PARAM_SHARDED = {"zero3", "fsdp", "fsdp-hybrid"}
ROOT_REDUCE = "root unit's reduce-scatter (embeddings and head, at the end of backward)"
FORWARD_START = "forward start (embeddings, head and the first layer gathered)"
REGATHER = "root unit gathered again (embeddings and head, at the start of backward)"


class ShardedMemory(BaseModel):
    """Bytes per GPU (and per node for host RAM) of one training step spread over `gpus` GPUs."""

    gpus: int
    nodes: int
    sharding: Sharding
    offload: Offload
    shard_group: int = Field(description="GPUs one copy of the sharded state is split over")
    weights_bytes: int = Field(description="resident weight shard (adapters included)")
    gathered_bytes: int = Field(description="parameters gathered for the current and the prefetched unit")
    gradients_bytes: int = Field(description="gradients alive at the peak, this GPU's share")
    peak_phase: str = Field(description="the step's peak once sharded (sharding can move it: gradients shrink, "
                                        "activations do not)")
    optimizer_bytes: int
    comm_buffer_bytes: int
    other_bytes: int = Field(description="activations and transient buffers at the peak (not sharded)")
    peak_allocated_bytes: int
    required_bytes: int
    host_offload_bytes_per_node: int
    host_loading_bytes_per_node: int = Field(description="host RAM to load the checkpoint, per node")
    checkpoint_bytes: int = Field(description="one saved checkpoint on disk: weights as trained, optimizer states")
    notes: list[str]


def validate(gpus: int, nodes: int, sharding: str, offload: str) -> None:
    if gpus <= 0 or nodes <= 0:
        raise PlannerError(f"--gpus and --nodes must be positive, got {gpus} and {nodes}")
    if gpus % nodes:
        raise PlannerError(f"--gpus {gpus} is not a multiple of --nodes {nodes}; give GPUs in total, the same "
                           "number on every node")
    if sharding == "none" and gpus > 1:
        raise PlannerError("--sharding none holds the whole job on one GPU; with several GPUs use ddp, zero1-3 or "
                           "fsdp")
    if offload == "params" and sharding not in PARAM_SHARDED:
        raise PlannerError(f"--offload params needs parameter sharding (zero3, fsdp, fsdp-hybrid), not {sharding}")
    if offload == "optimizer" and sharding not in ("zero1", "zero2", "zero3"):
        raise PlannerError(f"--offload optimizer is DeepSpeed ZeRO's (zero1-3); with {sharding} use --offload "
                           "params (FSDP offloads parameters with their gradients and states)")


def shard(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, *, gpus: int, nodes: int = 1,
          sharding: Sharding = "ddp", offload: Offload = "none", device: Device = "cuda") -> ShardedMemory:
    """Per-GPU memory of `memory` (the single-GPU breakdown, estimated for `device`) under `sharding` over
    `gpus` GPUs."""
    validate(gpus, nodes, sharding, offload)
    per_node = gpus // nodes
    group = {"none": 1, "ddp": 1, "fsdp-hybrid": per_node}.get(sharding, gpus)
    notes = []
    checkpoint = memory.weights_bytes * (setup.method == "full") + memory.adapter_bytes + memory.optimizer_bytes \
        + memory.paged_optimizer_bytes  # weights as trained and the states
    loading = loading_bytes_per_node(memory.weights_bytes, sharding, per_node)
    deepspeed = sharding.startswith("zero")
    if deepspeed and setup.method == "full":
        setup, memory, checkpoint = ds.view(layout, setup, device, memory.accumulating)
        notes.append("DeepSpeed: the model in the compute dtype (no autocast under DeepSpeed); the optimizer's "
                     "partitions hold fp32 master weights and its states, and an fp32 gradient partition while "
                     "it steps")
    weights = memory.weights_bytes + memory.adapter_bytes
    states = memory.optimizer_bytes
    w, s = weights, states
    grad_divisor = group if sharding in ("zero2", "zero3", "fsdp", "fsdp-hybrid") else 1
    if sharding in ("zero1", "zero2", "zero3", "fsdp", "fsdp-hybrid"):
        s = states // group
    gathered = 0
    if sharding in PARAM_SHARDED:
        w = weights // group
        gathered = _gathered(layout, setup, memory, group, [] if deepspeed else notes)  # DeepSpeed says its own
    comm = 2 * DDP_BUCKET_BYTES if sharding == "ddp" else 0
    if gpus == 1:
        comm, gathered = 0, 0
    unsynced = _unsynced_gradients(setup, memory, sharding, gpus, notes)
    step = _as_run(layout, setup, memory, sharding, gpus, device, notes)
    terms = _phase_terms(layout, setup, memory, step, sharding, group, device, gpus,
                         unsynced=unsynced, grad_divisor=grad_divisor, gathered=gathered, comm=comm)
    terms |= _moments(layout, setup, memory, step, sharding, group, device, terms, gathered, gpus // group)
    if deepspeed and gpus > 1:
        notes.append("DeepSpeed buffers: a reduce bucket of hidden^2 elements (the Trainer's 'auto')"
                     + ("; parameters gathered for the forward stay gathered while reused within 1e9 parameters"
                        "; not counted: DeepSpeed's prefetch can hold up to stage3_max_live_parameters (1e9) "
                        "gathered, up to 2 GB more in bf16 (benchmarks/DEEPSPEED.md)"
                        if sharding == "zero3" else ""))
    phase = max(terms, key=lambda k: sum(terms[k]))
    g, other, gathered, comm = terms[phase]
    w, s, host = _offloaded(w, s, offload, per_node, notes)
    peak = w + gathered + g + s + comm + other
    paged = memory.paged_optimizer_bytes // (group if sharding not in ("none", "ddp") else 1)
    required = peak + sum(outside_allocator(peak)) + (0 if offload != "none" else paged)
    return ShardedMemory(gpus=gpus, nodes=nodes, sharding=sharding, offload=offload, shard_group=group,
                         weights_bytes=w, gathered_bytes=gathered, gradients_bytes=g, peak_phase=phase,
                         optimizer_bytes=s, comm_buffer_bytes=comm, other_bytes=other, peak_allocated_bytes=peak,
                         required_bytes=required,
                         host_offload_bytes_per_node=host, host_loading_bytes_per_node=loading,
                         checkpoint_bytes=checkpoint, notes=notes)


def _phase_terms(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, step: MemoryBreakdown,
                 sharding: Sharding, group: int, device: Device, gpus: int, *, unsynced: int, grad_divisor: int,
                 gathered: int, comm: int) -> dict[str, tuple[int, int, int, int]]:
    """(gradients held, other, gathered, buffers) per phase of the step on one GPU: a gradient not yet reduced is
    whole (unsynced), else this GPU's share; the root unit's gradients stay whole until it reduces; the layers'
    backward holds its own gathered set; DeepSpeed adds its buffers."""
    terms = {}
    for name, (grads, other) in _phases(memory, step, sharding, group).items():
        held = unsynced if unsynced and name != OPTIMIZER_STEP else grads // grad_divisor
        held += _root_held_whole(layout, setup, memory, sharding, group, name)
        terms[name] = (held, other, _in_backward(layout, setup, memory, sharding, group, name, device) or gathered,
                       comm)
        if sharding.startswith("zero") and gpus > 1:
            terms[name] = ds.phase_terms(layout, setup, sharding, group, name, *terms[name][:3])
    return terms


def _offloaded(weights: int, states: int, offload: Offload, per_node: int, notes: list[str]) -> tuple[int, int, int]:
    """(weights, states) left on the GPU and the host RAM per node that takes the rest."""
    if offload == "optimizer":
        return weights, 0, states * per_node
    if offload == "params":
        notes.append("parameters offloaded: each unit is copied to the GPU when used (PCIe-bound)")
        return 0, 0, (weights + states) * per_node
    return weights, states, 0


def _gathered(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, group: int,
              notes: list[str]) -> int:
    """Bytes of the gathered working set under parameter sharding: the unit being computed (a decoder layer,
    or embeddings and head) plus the next one prefetched."""
    if group <= 1:
        return 0
    layer, root = _unit_bytes(layout, setup, memory)
    notes.append("gathered working set: the unit being computed (a decoder layer, or embeddings and head) plus "
                 f"the next one prefetched, in the {'compute' if setup.precision.endswith('-mixed') else 'storage'} "
                 "dtype")
    return max(layer, root) + layer


def _in_backward(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, sharding: Sharding,
                 group: int, phase: str, device: Device = "cuda") -> int:
    """FSDP2's gathered bytes through the decoder layers' backward (0 elsewhere, or without FSDP): the root unit
    stays gathered from the start of backward until it reduces at the end, beside the layer being computed and
    the next one prefetched - and, for full fine-tuning, the reduce-scatter input of the layer before, which
    FSDP keeps until the next layer reduces (its reduce_scatter_states; at the first layer, the second's). On
    the CPU gloo's all-gather of the prefetched layer also copies its output while it runs."""
    if sharding not in ("fsdp", "fsdp-hybrid") or group <= 1 or phase not in (LAST_LAYER, FIRST_LAYER):
        return 0
    layer, root = _unit_bytes(layout, setup, memory)
    if phase == FIRST_LAYER:  # nothing left to prefetch; the second layer's reduce-scatter input is kept
        return root + layer + (layer if setup.method == "full" and layout.dims.layers > 1 else 0)
    # the layers' backward below the top one: the layer above has reduced, the one below is being gathered
    kept = layer if setup.method == "full" and layout.dims.layers > 2 else 0
    prefetched = layer * (2 if device == "cpu" else 1) if layout.dims.layers > 1 else 0
    return root + layer + kept + prefetched


def _unit_bytes(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown) -> tuple[int, int]:
    """Bytes of one decoder layer's unit and of the root unit (embeddings, final norm, head) once gathered.

    Under -mixed precision FSDP's mixed-precision policy (accelerate sets param_dtype from --mixed_precision) and
    DeepSpeed's bf16/fp16 modules gather in the compute dtype; QLoRA's 4-bit weights are gathered as stored."""
    mixed = setup.precision.endswith("-mixed")
    layers = layout.dims.layers
    per_layer = [g for g in layout.modules if g.per_layer]
    layer_params, root_params = layout.layer_params(), layout.root_params()
    if setup.method == "qlora":
        cap = 2 if mixed else 4  # prepare_model_for_kbit_training keeps every unquantized parameter in fp32
        layer = sum(qlora_group_bytes(g, setup.double_quant, unquantized=cap) for g in per_layer)
        root = root_params * cap
    else:
        per_param = memory.weights_bytes / max(layout.total_params(), 1)
        per_param = min(per_param, 2) if mixed else per_param
        layer, root = layer_params * per_param, root_params * per_param
    layer += memory.adapter_bytes / max(layers, 1) * (0.5 if mixed else 1)  # adapters live in their layer's unit
    return int(layer), int(root)


def _moments(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, step: MemoryBreakdown,
             sharding: Sharding, group: int, device: Device, terms: dict[str, tuple[int, int, int, int]],
             gathered: int, replicas: int = 1) -> dict:
    """Candidates for the peak the single GPU's phases do not have - FSDP2's and ZeRO-3's own moments - from the
    step as it runs sharded (`step`: its memory, bf16 where the scheme gathers so)."""
    if sharding not in ("zero3", "fsdp", "fsdp-hybrid") or group <= 1:
        return {}
    if sharding == "zero3":
        return ds.zero3_moments(layout, setup, step, gathered, terms, device)
    return _fsdp_moments(layout, setup, memory, step, sharding, group, device, terms, replicas)


def _fsdp_moments(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, step: MemoryBreakdown,
                  sharding: Sharding, group: int, device: Device, terms: dict[str, tuple[int, int, int, int]],
                  replicas: int = 1) -> dict:
    """FSDP2's own candidates for the peak, as (held gradients, other, gathered, comm) like the phases' terms:

    - the forward's start: as each unit's weights are copied out of its all-gather, FSDP keeps the previous
      unit's all-gather output until then - the root unit's weights (gathered for the embeddings, kept until
      the head) and their all-gather output beside the first layer's, or later a layer's beside the previous
      one's;
    - the backward's start: the root unit, resharded after the forward, is gathered again beside every
      activation; its all-gather output is freed once copied (on the CPU gloo's all-gather also copies its
      output while it runs, beside the input cast to bf16);
    - the end of backward: the root unit reduce-scatters last (_root_reduce).

    Gradients held are those of the earlier micro-batches, as the phases hold them. Across nodes (HSDP) each
    unit all-reduces its shard in the reduce dtype, and FSDP2 holds that buffer until the end of backward
    (FSDPParamGroup._all_reduce_state): every unit's before the root unit reduces, beside the end of backward."""
    layer, root = _unit_bytes(layout, setup, memory)
    earlier, kept = terms[END_OF_FORWARD][0], step.logits_kept_bytes  # a custom loop's logits, until replaced
    cast = root // group if setup.precision.endswith("-mixed") else 0
    regather = 2 * root + (cast if device == "cpu" else 0)
    moments = {FORWARD_START: (earlier, kept, max(2 * (root + layer), root + 3 * layer), 0),
               REGATHER: (earlier, step.activations_bytes + kept, regather, 0)}
    shards = _all_reduced(layout, setup, memory, group) if replicas > 1 else 0
    if reduce := _root_reduce(layout, setup, memory, sharding, group, device):
        # every unit reduced (no_sync's whole gradients are gone); the root unit was resharded first
        moments[ROOT_REDUCE] = (memory.gradients_bytes // group + shards, reduce, 0, 0)  # buffers, none gathered
    if shards:
        held, other, gathered, comm = terms[END_OF_BACKWARD]
        moments[END_OF_BACKWARD] = (held + shards, other, gathered, comm)
    return moments


def _all_reduced(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, group: int) -> int:
    """HSDP: the all-reduced gradient shards of every unit but the root, in the reduce dtype (bf16 under the
    policy), which FSDP2 holds until the end of backward - beside the sharded gradients cast from them; with no
    cast the buffer is the sharded gradient itself."""
    own, reduce = _grad_bytes(setup)
    if reduce == own:
        return 0
    root = layout.root_params() if setup.method == "full" else 0
    return max(0, memory.gradients_bytes // own - root) // group * reduce


def _root_unit(layout: ModelLayout, setup: TrainingSetup, sharding: Sharding,
               group: int) -> tuple[int, int, int] | None:
    """FSDP's root unit (embeddings, final norm, head) as full fine-tuning trains it: (its parameters, the bytes
    of a sharded gradient, the bytes of a gathered one - bf16 under accelerate's policy, which also reduces in
    bf16). None where it has no gradients to reduce-scatter."""
    if sharding not in ("fsdp", "fsdp-hybrid") or group <= 1 or setup.method != "full":
        return None
    return (layout.root_params(), *_grad_bytes(setup))


def _grad_bytes(setup: TrainingSetup) -> tuple[int, int]:
    """(bytes of a sharded gradient, bytes of a gathered one): the parameters' dtype, and under accelerate's
    mixed-precision policy bf16 - which it also reduces in."""
    own = gradient_bytes(setup)
    return own, 2 if setup.precision.endswith("-mixed") else own


def _root_held_whole(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, sharding: Sharding,
                     group: int, phase: str) -> int:
    """Bytes a backward phase holds beyond its sharded gradients: the root unit reduce-scatters only after the
    rest of backward, so until then the gradients it has (the head's and final norm's from the last layer on,
    the embedding's at the end) are whole, in the gathered dtype, not this GPU's shard - beside the earlier
    micro-batches' shards with sync_each_batch; under no_sync every gradient is held whole already."""
    unit = _root_unit(layout, setup, sharding, group)
    if unit is None or (memory.accumulating and not setup.sync_each_batch):
        return 0
    root, own, gathered = unit
    embedding = 0 if layout.dims.tied_embeddings else \
        sum(g.params() for g in layout.modules if g.kind == "embedding")
    present = {LAST_LAYER: root - embedding, FIRST_LAYER: root - embedding, END_OF_BACKWARD: root}.get(phase, 0)
    if memory.accumulating:  # sync_each_batch: this micro-batch's whole gradients beside the earlier shards
        return present * gathered
    return present * gathered - present * own // group


def _root_reduce(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, sharding: Sharding,
                 group: int, device: Device = "cuda") -> int:
    """FSDP2's buffers while the root unit, the last to finish backward, reduce-scatters full fine-tuning's
    gradients (torch's foreach_reduce): its reduce-scatter input (the unit's gradients in the reduce dtype, kept
    until the end of backward), the unit's last gradient (the head's, untied; a loop variable keeps it past the
    copy-in), the output shard and, where the reduce dtype is not the parameters', its cast - and with
    sync_each_batch a later micro-batch's new shard beside the one it is added to. The unit's own gathered
    weights are resharded before it reduces. On the CPU gloo's reduce-scatter copies its whole input while it
    runs, before the shard is made. 0 where no such reduce happens."""
    unit = _root_unit(layout, setup, sharding, group)
    if unit is None:
        return 0
    root, own, reduce = unit
    heads = [g for g in layout.modules if g.kind == "head"]
    # the unit's parameters in registration order end with the head's weight, or its bias where it has one
    last = 0 if layout.dims.tied_embeddings else sum(g.bias or g.weight_numel for g in heads)
    shard = root // group
    synced = memory.accumulating and setup.sync_each_batch  # the shard it adds into is held already
    kept = (root + last) * reduce
    cast = kept + (shard * reduce if reduce != own else 0) + (shard * own if synced else 0)
    if device != "cpu":
        return cast
    return max(cast, kept + shard * reduce + root * reduce - (0 if synced else shard * own))


def _unsynced_gradients(setup: TrainingSetup, memory: MemoryBreakdown, sharding: Sharding, gpus: int,
                        notes: list[str]) -> int:
    """FSDP with gradient accumulation as the Trainer runs it: the micro-steps before the last run under
    accelerate's no_sync (FSDP2's set_requires_gradient_sync(False)), so every GPU keeps the whole model's
    gradients unsharded - in the gathered dtype (accelerate's policy: bf16 under -mixed) - from the first
    micro-step's backward until the last one reduce-scatters them. 0 when they are sharded as they are made."""
    if not (memory.accumulating and sharding in ("fsdp", "fsdp-hybrid") and gpus > 1) or setup.sync_each_batch:
        return 0
    notes.append("gradient accumulation under FSDP as the Trainer runs it (no_sync until the last micro-batch): "
                 "every GPU holds the whole model's gradients unsharded; --sync-each-batch reduce-scatters them "
                 "every micro-batch instead")
    return memory.gradients_bytes // 2 if setup.precision.endswith("-mixed") else memory.gradients_bytes


def _bf16_step(layout: ModelLayout, setup: TrainingSetup, sharding: Sharding, gpus: int) -> str | None:
    """What makes every parameter compute in bf16 under `sharding` (None: nothing, the single GPU's step holds).
    DeepSpeed's bf16 casts the whole module at every stage and accelerate turns autocast off - full fine-tuning
    arrives already as the bf16 model deepspeed.view made, with its own optimizer step, so nothing is redone;
    FSDP's mixed-precision policy gathers every weight in bf16, and fp32 MoE experts whatever the precision, as
    ZeRO-3's gathering does."""
    mixed, experts = setup.precision.endswith("-mixed"), bool(layout.dims.experts)
    if sharding.startswith("zero"):
        if setup.method == "full":
            return None
        if mixed:
            return "DeepSpeed casts the model to bf16"
        return "ZeRO-3 gathers the experts in bf16" if sharding == "zero3" and gpus > 1 and experts else None
    if sharding.startswith("fsdp") and gpus > 1 and (mixed or experts):
        return "weights gathered in bf16 by the mixed-precision policy"
    return None


def _as_run(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown, sharding: Sharding, gpus: int,
            device: Device, notes: list[str]) -> MemoryBreakdown:
    """The single-GPU step as it runs under `sharding`: re-estimated on bf16 parameters where the scheme makes
    them so (_bf16_step), else `memory` itself."""
    maker = _bf16_step(layout, setup, sharding, gpus)
    if not maker:
        return memory
    if setup.precision.endswith("-mixed"):
        notes.append(f"{maker}: no autocast weight copies, a bf16 residual stream")
    return estimate_memory(layout, setup, device=device, gathered_half=True, accumulating=memory.accumulating)


def _phases(memory: MemoryBreakdown, step: MemoryBreakdown, sharding: Sharding,
            group: int) -> dict[str, tuple[int, int]]:
    """The phases of the step as it runs (`step`), (gradients, the rest), as a GPU of the sharded job sees them;
    `memory`, the breakdown shard() was given, for its weights and states."""
    weights, states = memory.weights_bytes + memory.adapter_bytes, memory.optimizer_bytes
    phases = dict(step.phase_bytes or {step.peak_phase: (step.held_gradient_bytes, step.peak_allocated_bytes
                                                         - weights - states - step.held_gradient_bytes)})
    if OPTIMIZER_STEP in phases and sharding not in ("none", "ddp"):  # each GPU steps only its shard of the states
        grads, transient = phases[OPTIMIZER_STEP]
        phases[OPTIMIZER_STEP] = (grads, transient // group)
    return phases


def loading_bytes_per_node(weights_bytes: int, sharding: str, gpus_per_node: int) -> int:
    """Host RAM one node needs to load the checkpoint: every process reads it in its storage dtype, except
    FSDP with cpu_ram_efficient_loading, where rank 0 of each node loads and broadcasts."""
    return weights_bytes * (1 if sharding.startswith("fsdp") else gpus_per_node)


def smallest_gpu_count(gpu_memory_bytes: int, gpus_per_instance: int, required_for, *,
                       max_gpus: int = 512) -> int | None:
    """The fewest GPUs (whole instances beyond one) whose per-GPU requirement, `required_for(n)`,
    fits in `gpu_memory_bytes`; None when nothing up to max_gpus does."""
    counts = [n for n in (1, 2, 4, 8) if n <= gpus_per_instance]
    n = gpus_per_instance
    while n * 2 <= max_gpus:
        n *= 2
        counts.append(n)
    return next((n for n in counts if required_for(n) <= gpu_memory_bytes), None)
