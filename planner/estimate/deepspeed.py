"""What DeepSpeed ZeRO holds beyond the shards, as ftplan's hf backend runs it: accelerate with the Trainer's
"auto" bucket sizes (reduce bucket hidden^2 elements) and DeepSpeed's other defaults (v0.19: overlap_comm on
for ZeRO-3 only, contiguous gradients, stage3_max_reuse_distance 1e9).

Read from DeepSpeed's source (runtime/zero/stage_1_and_2.py, stage3.py, partitioned_param_coordinator.py) and
checked on the CPU by benchmarks/deepspeed_cpu.py (two gloo processes, DeepSpeed 0.19.8; DEEPSPEED.md):

- ZeRO-1/2 stage gradients through a reduce bucket during backward (two with overlap_comm), released after it.
  At the step the gradient partition is held twice in the compute dtype - the buffer the gradients were reduced
  into (with the parameter straddling each partition edge) and its flat copy - beside its fp32 conversion.
  ZeRO-1 keeps whole gradients through the backward and reduces them in a pass after it, into a partition
  buffer beside them. The gradient norm goes through fp64 copies of the partition's slices.
- ZeRO-3 keeps its reduce bucket and the gradient partition from start-up, and a parameter gathered for the
  forward stays gathered while it will be used again within stage3_max_reuse_distance parameters: at the end
  of the forward the trailing units whose backward follows within that distance (all of a model under 5e8
  parameters). It steps its partition by sub-groups of 1e9 elements. A tied head's gradient is reduced only
  once the embedding's backward has added to it.
"""

from __future__ import annotations

from ftplan.estimate import optimizer as opt
from ftplan.estimate.memory import (
    END_OF_BACKWARD,
    END_OF_FORWARD,
    FIRST_LAYER,
    LAST_LAYER,
    OPTIMIZER_STEP,
    MemoryBreakdown,
    estimate_memory,
)
from ftplan.estimate.optimizer import Device
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.layout import ModelLayout

MAX_REUSE_DISTANCE = 10**9  # DeepSpeed's stage3_max_reuse_distance default, in parameters
SUB_GROUP_SIZE = 10**9  # DeepSpeed's sub_group_size default: ZeRO-3 steps its partition in groups this large
OVERLAP_COMM = {"zero1": False, "zero2": False, "zero3": True}  # DeepSpeed's default by stage
HEAD_PREFETCH = "head prefetched (at the end of the layers' forward)"
PREFETCH_BUCKET = 0.9  # the Trainer's "auto" stage3_prefetch_bucket_size, in hidden^2 elements


def view(layout: ModelLayout, setup: TrainingSetup, device: Device,
         accumulating: bool = False) -> tuple[TrainingSetup, MemoryBreakdown, int]:
    """Full fine-tuning under DeepSpeed ZeRO, as the Trainer runs it: (the setup the step runs in, its memory
    before sharding, one checkpoint's bytes).

    accelerate turns autocast off under DeepSpeed and the engine casts the module to bf16/fp16, so a -mixed step
    is the pure-precision one (no autocast weight copies, gradients in that dtype). Whatever the precision, the
    ZeRO optimizer keeps an fp32 master copy of every trained parameter and hands the wrapped optimizer one flat
    fp32 partition per parameter group (states as for one 1-D tensor: Adafactor cannot factor it, 8-bit states
    have no embedding exception), and converts the gradient partition to fp32 while it steps. DeepSpeed's own
    estimator for ZeRO-2 (estimate_zero2_model_states_mem_needs, v0.14.3 on) gives 2 * params + 18 * params / GPUs
    for the model states; the step's flat gradient copy (step_phase) comes on top."""
    pure = setup.model_copy(update={"precision": setup.precision.removesuffix("-mixed")})
    memory = estimate_memory(layout, pure, device=device, accumulating=accumulating)
    params = layout.total_params()
    flat = [opt.Trainable((params,))]
    fp32 = setup.model_copy(update={"precision": "fp32"})
    states = opt.state_bytes(flat, fp32)
    paged = states if opt.paged(setup) else 0
    grads = memory.phase_bytes[OPTIMIZER_STEP][0]
    phases = {**memory.phase_bytes, OPTIMIZER_STEP: (grads, 4 * params + opt.step_transient(flat, fp32, device))}
    memory = memory.model_copy(update={"optimizer_bytes": 4 * params + states - paged, "paged_optimizer_bytes": paged,
                                       "phase_bytes": phases})
    # ftplan's hf backend checkpoints the fp32 master weights and the optimizer's states, gathered from ZeRO's
    # partitions by parameter (the 16-bit module is the masters rounded: it is not saved again)
    checkpoint = 4 * params + states
    return pure, memory, checkpoint


def grad_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of DeepSpeed's gradients and buckets: the module's dtype."""
    return 4 if setup.precision == "fp32" else 2


def bucket_bytes(layout: ModelLayout, setup: TrainingSetup, sharding: str) -> int:
    """The reduce bucket(s): hidden^2 elements (the Trainer's "auto"), two with overlap_comm below ZeRO-3."""
    buckets = 2 if OVERLAP_COMM[sharding] and sharding != "zero3" else 1
    return buckets * layout.dims.hidden ** 2 * grad_bytes(setup)


def kept_params(layout: ModelLayout, grad_ckpt: bool = False, embedding_in_backward: bool = True) -> int:
    """Parameters ZeRO-3 still holds gathered at the end of the forward: a unit stays gathered while its
    backward use comes within MAX_REUSE_DISTANCE parameters of the trace, i.e. twice the parameters of the units
    after it (each is used once more in the forward and once in the backward; a checkpointed layer three times,
    its recomputation too). A tied head is the embedding's weight, gathered again at the end of the forward.
    A frozen embedding has no backward use unless PEFT makes its output require grad, which it does only for
    gradient checkpointing (enable_input_require_grads): then it is released after its forward."""
    per_layer = layout.layer_params()
    first = sum(g.params() for g in layout.modules if not g.per_layer and g.kind == "embedding")
    last = layout.root_params() - first
    if layout.dims.tied_embeddings:
        last += layout.head_numel()
    units = [first] + [per_layer] * layout.dims.layers + [last]  # forward order
    uses = [2] + [3 if grad_ckpt else 2] * layout.dims.layers + [2]
    if not embedding_in_backward:
        units, uses = units[1:], uses[1:]
    kept, distance = 0, 0
    for unit, used in zip(reversed(units), reversed(uses)):
        if distance >= MAX_REUSE_DISTANCE:
            break
        kept += unit
        distance += used * unit
    return min(kept, layout.total_params())


def phase_terms(layout: ModelLayout, setup: TrainingSetup, sharding: str, group: int, phase: str,
                grads: int, other: int, gathered: int) -> tuple[int, int, int, int]:
    """(gradients, other, gathered, buffers) of one phase on one GPU of a DeepSpeed job, from the sharded
    (gradients, other) and the gathered working set ftplan counts for parameter sharding."""
    b, params = grad_bytes(setup), layout.total_params()
    full = setup.method == "full"
    bucket = bucket_bytes(layout, setup, sharding)
    partition = b * params // group
    straddle = 0 if sharding == "zero3" else largest_layer_param(layout) * b * min(2, group - 1)
    if sharding == "zero3":
        if full:
            grads = max(grads, partition)  # the gradient partition lives from start-up
        per_param = _bytes_per_param(layout, gathered)
        if phase in (END_OF_BACKWARD, OPTIMIZER_STEP):
            gathered = 0  # released by the end of the backward
        else:  # ZeRO-3 fetches each module's own weights, and prefetches within its bucket
            gathered = int((largest_param(layout) + PREFETCH_BUCKET * layout.dims.hidden ** 2) * per_param)
        if phase not in (END_OF_BACKWARD, OPTIMIZER_STEP, FIRST_LAYER):  # by the first layer the rest is released
            gathered = max(gathered, int(_kept(layout, setup) * per_param))
    elif phase == OPTIMIZER_STEP:
        bucket = 0
    elif sharding == "zero1" and full and phase == END_OF_BACKWARD:
        grads += partition + straddle  # reduced after the backward, into a buffer, beside the full gradients
    if sharding != "zero1" and phase in (LAST_LAYER, FIRST_LAYER) and layout.dims.tied_embeddings:
        # a tied head's gradient is reduced only once the embedding's backward has added to it
        grads += layout.dims.vocab * layout.dims.hidden * grad_bytes(setup) * (group - 1) // group
    if full and phase == OPTIMIZER_STEP:
        grads, other = _step(layout, sharding, group, b, grads, other, straddle)
    return grads, other, gathered, bucket


def zero3_moments(layout: ModelLayout, setup: TrainingSetup, step: MemoryBreakdown, gathered: int,
                  terms: dict[str, tuple[int, int, int, int]], device: Device = "cuda") -> dict:
    """ZeRO-3's own candidate for the peak, as (gradients, other, gathered, buffers) like phase_terms': the end
    of the layers' forward, as the head is prefetched - what is kept for the backward is gathered beside the
    activations saved so far (none of the head's yet). On the CPU gloo's all-gather of an untied head holds a copy
    of its output until the head's own fetch waits on it (a probe of DeepSpeed's fetches: the resident set rose by
    the head's bf16 bytes at the prefetch and fell by them at the fetch). `gathered`: the working set ftplan
    counts for parameter sharding, which gives the bytes of a gathered parameter; `step`: the step's memory as
    it runs (DeepSpeed's bf16 module); `terms`: the phases' terms, whose end of forward gives the gradients held
    and the bucket."""
    grads, _, _, bucket = terms[END_OF_FORWARD]
    saved = step.activations_bytes - sum(v for k, v in step.head_terms.items() if k != "embedding_dropout")
    fetched = device == "cpu" and not layout.dims.tied_embeddings  # a tied head is the embedding, gathered already
    head = layout.head_numel() if fetched else 0
    gathered_now = int((_kept(layout, setup) + head) * _bytes_per_param(layout, gathered))
    return {HEAD_PREFETCH: (grads, saved + step.logits_kept_bytes, gathered_now, bucket)}


def _kept(layout: ModelLayout, setup: TrainingSetup) -> int:
    """kept_params for this setup: a frozen embedding takes part in the backward only under checkpointing."""
    return kept_params(layout, setup.grad_ckpt, embedding_in_backward=setup.method == "full" or setup.grad_ckpt)


def _bytes_per_param(layout: ModelLayout, gathered: int) -> float:
    """Bytes of one gathered parameter, from the working set ftplan counts for parameter sharding."""
    return gathered / max(1, _unit_params(layout))


def _step(layout: ModelLayout, sharding: str, group: int, b: int, grads: int, other: int,
          straddle: int) -> tuple[int, int]:
    """(gradients, other) at DeepSpeed's step, `other` holding the fp32 gradient partition (4 x params / GPUs).

    ZeRO-1/2: the gradient partition in the buffer it was reduced into, its flat copy and that copy in fp32 -
    or, while the norm is taken, the buffer and one gradient slice in fp64. ZeRO-3: its gradient partition,
    and the flat copy and fp32 copy of one sub-group (sub_group_size elements) at a time."""
    params = layout.total_params()
    fp32 = 4 * params // group
    if sharding == "zero3":
        sub = min(params // group, SUB_GROUP_SIZE + largest_param(layout) // group)
        return grads + b * sub, other - fp32 + 4 * sub
    partition = b * params // group
    convert = (2 * partition + straddle, other)
    norm = (partition + straddle, other - fp32 + 8 * min(largest_param(layout), params // group))
    return max(convert, norm, key=sum)


def largest_param(layout: ModelLayout) -> int:
    """Elements of the largest weight."""
    return max((g.weight_numel for g in layout.modules if not g.shared_weight), default=0)


def largest_layer_param(layout: ModelLayout) -> int:
    """Elements of a layer's largest weight: what may straddle a ZeRO-1/2 partition's edge."""
    return max((g.weight_numel for g in layout.modules if g.per_layer), default=0)


def _unit_params(layout: ModelLayout) -> int:
    """Parameters of the working set ftplan gathers for parameter sharding (sharding._gathered's units)."""
    per_layer = layout.layer_params()
    return max(per_layer, layout.root_params()) + per_layer
