"""`estimate`: parameters, memory and fitting instances for one model under one or more methods."""

from __future__ import annotations

from pydantic import BaseModel, Field

from ftplan.data import catalog
from ftplan.estimate.fit import InstanceFit, cheapest_fits, hypothetical_gpu_name, judge, judge_gpu
from ftplan.estimate.memory import MemoryBreakdown, estimate_memory, lora_base_dtype, unquantized_matmul_params
from ftplan.estimate.optimizer import Device
from ftplan.estimate.params import TargetResolution, count_params, fit_dropout, over_ranked
from ftplan.estimate.published import PublishedMemoryCheck, published_check
from ftplan.estimate.settings import Method, SetupChoices, TrainingSetup, resolve
from ftplan.estimate.sharding import Offload, ShardedMemory, Sharding, shard, smallest_gpu_count, validate
from ftplan.model.inventory import layout_for
from ftplan.model.layout import ModelLayout
from ftplan.model.spec import ModelSpec

SCHEMA_VERSION = 1


class ModelInfo(BaseModel):
    """The model as estimated."""

    name: str
    hf_id: str | None
    model_type: str
    source: str
    license: str | None
    layers: int
    hidden_size: int
    vocab_size: int
    counting: str = Field(description="'analytic' or 'transformers meta device'")


class MethodEstimate(BaseModel):
    """Counts, memory and fitting instances for one method."""

    method: Method
    setup: TrainingSetup
    total_params: int
    trainable_params: int
    trainable_fraction: float
    targets: TargetResolution | None
    memory: MemoryBreakdown
    cheapest_instances: list[InstanceFit]
    selected: InstanceFit | None = Field(None, description="the --gpu/--instance verdict, when one was given")
    unquantized_linear_params: int = Field(0, description="qlora: weights of linear layers bitsandbytes leaves "
                                                          "unquantized (nn.Linear subclasses, fused MoE experts)")
    sharded: ShardedMemory | None = Field(None, description="per-GPU memory over --gpus with --sharding "
                                                            "(null for one GPU)")
    smallest_gpu_counts: dict[str, int | None] = Field(
        default_factory=dict, description="instance type -> fewest GPUs that fit with parameter sharding (FSDP, "
                                          "as recommend plans, unless --sharding names zero3 or fsdp-hybrid), null "
                                          "when none up to 512")
    published_check: PublishedMemoryCheck | None = Field(None, description="published GPU runs of this method and "
                                                                           "sharding against the memory model")


class EstimateReport(BaseModel):
    """What `ftplan estimate --json` prints."""

    schema_version: int = SCHEMA_VERSION
    model: ModelInfo
    settings: SetupChoices
    gpu: str | None
    gpu_memory_bytes: int | None = Field(None, description="--gpu-memory: the hypothetical GPU judged (null "
                                                           "otherwise)")
    instance: str | None
    grad_accum: int = Field(1, description="micro-batches per optimizer step the memory was estimated for: above 1 "
                                           "the gradients are held through every micro-batch")
    region: str | None = Field(description="the price region asked for; null: each instance in its own region "
                                           "(us-east-1 for the bundled catalog)")
    assumptions: list[str]
    estimates: list[MethodEstimate]


def assumptions(setups: list[TrainingSetup], region: str | None = None, grad_accum: int = 1) -> list[str]:
    """The defaults and modelling choices behind the numbers, in words."""
    rules = catalog.memory_rules()
    notes = [
        f"{s.method}: precision {s.precision}{' (matmuls on TF32 tensor cores)' if s.tf32 else ''}, "
        f"optimizer {s.optimizer}, gradient checkpointing "
        f"{'on' if s.grad_ckpt else 'off'}, attention {s.attention}, micro-batch {s.batch_size} x {s.seq_len} tokens"
        + (f", LoRA r={s.lora.r} alpha={s.lora.alpha} dropout={s.lora.dropout}" if s.lora else "")
        + (f", {s.quant_type.upper()}{' double-quantized' if s.double_quant else ''} base, fp32 non-quantized "
           "params (prepare_model_for_kbit_training)" if s.method == "qlora" else "")
        for s in setups
    ]
    methods = {s.method for s in setups}
    # only what applies to the methods shown: a QLoRA base is 4-bit (said above), full fine-tuning has no adapters
    if methods & {"lora", "qlora"}:
        bases = sorted({lora_base_dtype(s).replace("bf16", "bf16 (fp16 on GPUs without bf16)")
                        for s in setups if s.method == "lora"})
        notes.append("LoRA adapters are fp32 as PEFT creates them"
                     + (f"; LoRA's frozen base is {' / '.join(bases)}" if bases else ""))
    if any(s.optimizer == "adamw_torch_fused" for s in setups):
        notes.append("fused AdamW (the Trainer default with torch >= 2.8): no optimizer-step temporaries")
    notes += [
        "loss on fp32 logits (transformers upcasts them); log-softmax output kept for backward",
        (f"gradient accumulation {grad_accum}: the gradients are held through every micro-batch's forward and "
         "backward" if grad_accum > 1 else "one micro-batch per optimizer step (--grad-accum 1): with accumulation "
         "the gradients are also held through the later micro-batches, which --grad-accum N counts"),
        f"required = peak allocated + {rules.allocator_slack:.0%} allocator slack + "
        f"{rules.cuda_context_bytes // 2**20} MiB CUDA context + paged optimizer states",
        "memory: one GPU holds the whole model unless --gpus/--sharding say otherwise; prices: on-demand, "
        + (region or "each instance's own region (us-east-1 for the bundled catalog)"),
    ]
    return notes


def _report_warnings(spec: ModelSpec, choices: SetupChoices, estimates: list[MethodEstimate],
                     gpu_memory_bytes: int | None) -> list[str]:
    """What the whole report should warn about: a long context, a hypothetical GPU, sharding, stale prices."""
    warnings = []
    if (limit := spec.dims.max_positions) and choices.seq_len > limit:
        warnings.append(f"--seq-len {choices.seq_len} is above the model's max_position_embeddings ({limit}): it "
                        "was not trained on sequences this long (recommend refuses it without --allow-long-context)")
    if gpu_memory_bytes:
        warnings.append(f"--gpu-memory: a hypothetical {hypothetical_gpu_name(gpu_memory_bytes)}, assumed to run bf16 "
                        "and FlashAttention-2; no price")
    for note in sorted({n for e in estimates if e.sharded for n in e.sharded.notes}):
        warnings.append(f"sharded: {note}")
    shown = {(f.price_date, f.price_source) for e in estimates for f in [*e.cheapest_instances, e.selected] if f}
    return warnings + sorted({w for d, _ in shown if d and (w := catalog.stale_warning(d))})


def _smallest_counts(layout: ModelLayout, setup: TrainingSetup, memory: MemoryBreakdown,
                     sharding: Sharding | None, device: Device = "cuda") -> dict[str, int | None]:
    """Per instance type, the fewest GPUs that hold the step with parameter sharding."""
    scheme = sharding if sharding in ("zero3", "fsdp", "fsdp-hybrid") else "fsdp"
    cache: dict[tuple[int, int], int] = {}  # (gpus, gpus per instance) -> required bytes per GPU

    def required(n: int, per_instance: int) -> int:
        key = (n, per_instance)
        if key not in cache:
            cache[key] = shard(layout, setup, memory, gpus=n, nodes=max(1, n // per_instance),
                               sharding="none" if n == 1 else scheme, device=device).required_bytes
        return cache[key]

    return {inst.type: smallest_gpu_count(catalog.gpu_of(inst).memory_bytes, inst.gpu_count,
                                          lambda n, p=inst.gpu_count: required(n, p))
            for inst in catalog.instances().values()}


FALLBACK_NOTE = ("counted by building the model with transformers on the meta device (exact); the activation "
                 "terms assume a Llama-style decoder for this architecture and are approximate")


def _setups(layout: ModelLayout, methods: list[Method], choices: SetupChoices,
            bf16: bool) -> tuple[list[TrainingSetup], list[str]]:
    """Each method's resolved setup, and a note for every default fitted to the model."""
    setups, notes = [], []
    for method in methods:
        setup = resolve(method, choices, bf16_supported=bf16, model_type=layout.model_type)
        if setup.lora and (fitted := fit_dropout(layout, setup.lora)) is not setup.lora:
            setup = setup.model_copy(update={"lora": fitted})
            notes.append(f"{method}: LoRA dropout 0, not the default {choices.lora.dropout:g}: PEFT adapts the fused "
                         "MoE parameters through its ParamWrapper, which takes no dropout")
        setups.append(setup)
    return setups, notes


def _verdict(need: int, setup: TrainingSetup, instance: catalog.Instance | None, gpu: catalog.Gpu | None,
             memory_bytes: int | None, region: str | None) -> InstanceFit | None:
    """Whether `need` bytes per GPU fit the instance, GPU or memory size the user named (None: none named)."""
    if instance:
        return judge(instance, need, setup, region)
    if gpu or memory_bytes:
        return judge_gpu(gpu, need, setup, memory_bytes=memory_bytes)
    return None


def estimate(spec: ModelSpec, methods: list[Method], choices: SetupChoices, *, gpu: str | None = None,
             instance: str | None = None, trust_remote_code: bool = False, device: str = "cuda", gpus: int = 1,
             nodes: int = 1, sharding: Sharding | None = None, offload: Offload = "none",
             region: str | None = None, gpu_memory_bytes: int | None = None,
             grad_accum: int = 1) -> EstimateReport:
    """Estimate `methods` for `spec`. Pure: no I/O beyond the catalogs (and torch for unknown architectures).

    `grad_accum` > 1: the gradients outlive each micro-step, so they are held through the later micro-batches'
    forward and backward too.

    `gpu` (a catalogued GPU), `instance` or `gpu_memory_bytes` (a hypothetical GPU of that memory, unpriced)
    add a verdict per method. `device="cpu"` models the CPU's kernels, for comparison with `ftplan measure
    --device cpu`.
    """
    validate(gpus, nodes, sharding or ("ddp" if gpus > 1 else "none"), offload)
    selected_instance = catalog.get_instance(instance) if instance else None
    gpu_info = catalog.get_gpu(gpu) if gpu else (catalog.gpu_of(selected_instance) if selected_instance else None)
    layout, counting = layout_for(spec, trust_remote_code=trust_remote_code)
    bf16 = gpu_info.supports_bf16 if gpu_info else True
    estimates = []
    setups, warnings = _setups(layout, methods, choices, bf16)
    for setup in setups:
        counts = count_params(layout, setup.method, setup.lora)
        memory = estimate_memory(layout, setup, counts, device, accumulating=grad_accum > 1)
        sharded = None
        if gpus > 1 or sharding not in (None, "none") or offload != "none":
            sharded = shard(layout, setup, memory, gpus=gpus, nodes=nodes, offload=offload, device=device,
                            sharding=sharding or ("ddp" if gpus > 1 else "none"))
        need = sharded.required_bytes if sharded else memory.required_bytes
        if counts.targets and (big := over_ranked(layout, counts.targets, setup.lora.r)):
            warnings.append(f"{setup.method}: rank r={setup.lora.r} is not low-rank for {len(big)} adapted module "
                            f"type(s) (e.g. {big[0]}): their adapters hold at least as many parameters as the layers")
        selected = _verdict(need, setup, selected_instance, gpu_info, gpu_memory_bytes, region)
        estimates.append(MethodEstimate(
            method=setup.method, setup=setup, total_params=counts.total_params,
            trainable_params=counts.trainable_params,
            trainable_fraction=counts.trainable_params / counts.total_params,
            targets=counts.targets, memory=memory, selected=selected,
            unquantized_linear_params=unquantized_matmul_params(layout) if setup.method == "qlora" else 0,
            cheapest_instances=cheapest_fits(need, setup, gpu=gpu_info.name if gpu_info else None,
                                             min_gpus=gpus // nodes, region=region),
            sharded=sharded, smallest_gpu_counts=_smallest_counts(layout, setup, memory, sharding, device),
            published_check=published_check(setup.method, sharded.sharding if sharded else "none", device,
                                            gpus=gpus, offload=offload),
        ))
    warnings += _report_warnings(spec, choices, estimates, gpu_memory_bytes)
    if choices.sync_each_batch and not (sharding in ("fsdp", "fsdp-hybrid") and gpus > 1 and grad_accum > 1):
        warnings.append("--sync-each-batch changes nothing here: it is about FSDP (--sharding fsdp or fsdp-hybrid "
                        "over several GPUs) with --grad-accum above 1")
    info = ModelInfo(name=spec.name, hf_id=spec.hf_id, model_type=spec.model_type, source=spec.source,
                     license=spec.license, layers=spec.dims.layers, hidden_size=spec.dims.hidden,
                     vocab_size=spec.dims.vocab, counting=counting)
    return EstimateReport(model=info, settings=choices, gpu=gpu_info.name if gpu_info else None,
                          gpu_memory_bytes=gpu_memory_bytes,
                          instance=selected_instance.type if selected_instance else None, region=region,
                          grad_accum=grad_accum, assumptions=assumptions(setups, region, grad_accum)
                          + ([FALLBACK_NOTE] if counting != "analytic" else [])
                          + warnings,
                          estimates=estimates)
