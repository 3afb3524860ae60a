"""The bundled Hugging Face trainer backend: transformers + PEFT + bitsandbytes + accelerate, here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import Field

from ftplan.api import (
    BackendOptions,
    Plan,
    PlannerError,
    Problem,
    ProgressCallback,
    RunRequest,
    RunResult,
    TrainerBackend,
    check_targets,
    install_extras,
    resolve_model,
    weights_source,
)

from . import hardware

TRAIN_PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors")


def _local_problems(path: Path) -> list[Problem]:
    problems = []
    if not (path / "config.json").is_file():
        problems.append(Problem(message=f"{path} has no config.json", fix="point --model-path at a model directory"))
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        problems.append(Problem(
            message=f"{path} has no *.safetensors weights" + (f" (only pickle files: {', '.join(pickles)}; ftplan "
                                                                "never loads pickle)" if pickles else ""),
            fix="save the model with save_pretrained(safe_serialization=True) or convert it to safetensors"))
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        problems.append(Problem(message=f"{path} has no tokenizer", fix="save the tokenizer into the model directory"))
    return problems


class HuggingFaceOptions(BackendOptions):
    """`ftplan run --option KEY=VALUE` for the hf backend."""

    processes: int | None = Field(None, gt=0, description="training processes on this machine [default: the "
                                                           "plan's GPUs per instance when this machine has them, "
                                                           "else 1]")
    machine_rank: int = Field(0, ge=0, description="this node's rank in a multi-node plan")
    main_process_ip: str | None = Field(None, description="rank 0's address, required for multi-node plans")
    main_process_port: int = Field(29500, gt=0, lt=65536, description="rank 0's rendezvous port (multi-node)")
    machines: int | None = Field(None, gt=0, description="machines in the rendezvous [default: the plan's "
                                                          "instance count]; with main_process_ip")


def load_for_training(plan: Plan, request: RunRequest):
    """The ModelSpec, weights source and tokenizer (pad token set) a run trains with."""
    from transformers import AutoTokenizer

    source = weights_source(plan, request.model_path)
    path = Path(source).expanduser()
    where = str(path) if path.exists() else source
    spec = resolve_model(where)
    check_targets(plan, spec)  # before any weights load: a hand-edited target must not train something else
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=request.trust_remote_code)
    except Exception as exc:  # tokenizers raises its own types for a damaged tokenizer.json
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PlannerError(f"cannot load the tokenizer from {source}: {type(exc).__name__}"
                           + (f": {detail}" if detail else "") + "; check its tokenizer files") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual recipe for causal LMs without a pad token
    if tokenizer.pad_token_id is None:
        raise PlannerError(f"the tokenizer at {source} has neither a pad nor an eos token; add one")
    return spec, where, tokenizer


class HuggingFaceBackend(TrainerBackend):
    """Trains on this machine with the Hugging Face stack: one process, or several through accelerate
    (DDP, FSDP or DeepSpeed, as the plan's sharding says)."""

    name = "hf"
    description = "transformers + PEFT + bitsandbytes + accelerate on this machine (CPU or its CUDA GPUs)"
    methods = ("full", "lora", "qlora")
    platforms = ("any",)  # it trains where it runs: here, inside a SageMaker job, on a node SkyPilot or Slurm started
    options_model = HuggingFaceOptions
    owned_patterns = ("checkpoint-*", ".checkpoint-*.tmp", "adapter", "model", "tokenizer", ".adapter.tmp",
                      ".model.tmp", ".tokenizer.tmp", "accelerate_config.yaml", "deepspeed_config.json", "launch.sh",
                      ".request.json", ".result.json", ".result.json.tmp", ".events.jsonl")

    def checkpoint_step(self, request: RunRequest, options: HuggingFaceOptions) -> int | None:
        from .checkpoint import newest_intact, step_of

        path, _ = newest_intact(request.output_dir)
        return step_of(path) if path is not None else None

    def fit(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> hardware.Fit:
        """The plan's hardware against this machine's."""
        machines = (options.machines or plan.hardware.instance_count) if options.main_process_ip else None
        return hardware.compare(plan, request, hardware.gpus_here(), node_of=machines)

    def notices(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> list[str]:
        fit = self.fit(plan, request, options)
        return fit.warnings + [f"--here: {m}; training here anyway" for m in fit.mismatches if request.here]

    def check(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> list[Problem]:
        problems = self.supports(plan)
        fit = self.fit(plan, request, options)
        if fit.mismatches and not request.here:  # before anything loads: the plan was made for other hardware
            return problems + [Problem(
                message="; ".join(fit.mismatches) + " (backend hf trains on this machine)",
                fix="run it where it was planned with --backend skypilot (EC2 plans), or pass --here to train on "
                    "this machine anyway (the summary records it)")]
        setup = plan.training.setup
        missing = [p for p in TRAIN_PACKAGES if importlib.util.find_spec(p) is None]
        if (setup.method == "qlora" or "8bit" in setup.optimizer or "paged" in setup.optimizer) \
                and importlib.util.find_spec("bitsandbytes") is None:
            missing.append("bitsandbytes")
        if missing:
            problems.append(Problem(message=f"missing packages: {', '.join(missing)}",
                                    fix="pip install 'ftplan[train]'"))
            return problems
        import torch

        if request.device == "cuda" and not torch.cuda.is_available():
            problems.append(Problem(message="--device cuda but torch sees no CUDA GPU",
                                    fix="install a CUDA build of torch, or pass --device cpu"))
        on_gpu = request.device != "cpu" and torch.cuda.is_available()
        if on_gpu and setup.precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            problems.append(Problem(message="the plan trains in bf16 and this GPU has none",
                                    fix="re-plan for this GPU (ftplan recommend --instances ...) or edit "
                                        "training.setup.precision to fp16-mixed"))
        if setup.attention == "flash_attention_2" and (not on_gpu or importlib.util.find_spec("flash_attn") is None):
            problems.append(Problem(message="the plan uses FlashAttention-2, which needs a CUDA GPU and flash-attn",
                                    fix="pip install flash-attn on a GPU machine, or edit training.setup.attention "
                                        "to sdpa"))
        source = weights_source(plan, request.model_path)
        if source is None:
            problems.append(Problem(message="the plan names no weights (no local directory, no Hugging Face id)",
                                    fix="pass --model-path DIR or a Hugging Face id"))
        elif Path(source).expanduser().exists():
            problems += _local_problems(Path(source).expanduser())
        if options.machines and options.machine_rank >= options.machines:
            problems.append(Problem(message=f"machine_rank {options.machine_rank} is not below machines "
                                            f"{options.machines}", fix="number the nodes 0 to machines - 1"))
        problems += self._zero_problems(plan, request, options)
        if plan.hardware.sharding == "fsdp-hybrid":  # launch.accelerate_config has no hybrid-shard (HSDP) form
            problems.append(Problem(message="backend 'hf' cannot run hardware.sharding fsdp-hybrid: it would start "
                                            "plain DDP, every GPU holding the whole model",
                                    fix="edit hardware.sharding to fsdp (sharded over every GPU: no more memory "
                                        "per GPU than fsdp-hybrid)"))
        problems += self._split_problems(plan, request, options)
        problems += self._resume_problems(plan, request)
        return problems

    def _zero_problems(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> list[Problem]:
        """A ZeRO plan over several processes runs under DeepSpeed, which must be installed, and checkpoints its
        partitioned optimizer states by parameter (zero.py): bitsandbytes' 8-bit states are quantised per block of
        DeepSpeed's flat partition, not per element, so no checkpoint of them could be resumed."""
        if not plan.hardware.sharding.startswith("zero") or (self.processes(plan, request, options)[0] <= 1
                                                             and not options.main_process_ip):
            return []
        problems = []
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(Problem(message=f"the plan shards with DeepSpeed {plan.hardware.sharding} and deepspeed "
                                            "is not installed",
                                    fix=f"pip install 'ftplan[{','.join(install_extras(plan))}]'"))
        optimizer = plan.training.setup.optimizer
        if "8bit" in optimizer:
            problems.append(Problem(
                message=f"optimizer {optimizer} under DeepSpeed ZeRO: its 8-bit states are quantised per block of "
                        "ZeRO's flat partitions, so its checkpoints could not be resumed",
                fix="edit training.setup.optimizer to adamw_torch_fused, or hardware.sharding to fsdp"))
        return problems

    def _resume_problems(self, plan: Plan, request: RunRequest) -> list[Problem]:
        """--resume continues the checkpoint's run: the same data, plan and method, or it is refused here,
        before anything is written, with the difference named."""
        if not request.resume:
            return []
        from . import fingerprint
        from .checkpoint import newest_intact, read_state

        path, _ = newest_intact(request.output_dir)
        if path is None:
            return []
        differs = fingerprint.difference(read_state(path).get("fingerprint"), fingerprint.of(plan, request))
        if not differs:
            return []
        return [Problem(message=f"--resume: {path.name} {differs}",
                        fix="resume with the plan and --data the checkpoint was trained with, or start a new run "
                            "(another --output, or --force without --resume)")]

    def _split_problems(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> list[Problem]:
        """Every process takes whole micro-batches: the plan's accumulation x GPUs must divide among them (said
        here, before the launcher starts, rather than by a worker's traceback)."""
        from .loop import accumulation

        t, count = plan.training, self.processes(plan, request, options)[0]
        if count <= 1 or accumulation(plan, count) is not None:
            return []
        world = plan.hardware.instance_count * plan.hardware.gpus_per_instance
        return [Problem(message=f"{count} processes cannot split the plan's global batch ({t.global_batch} = "
                                f"micro-batch {t.setup.batch_size} x {t.grad_accum} accumulation x {world} GPU(s))",
                        fix=f"use --option processes=N with N dividing {t.grad_accum * world}, or re-plan with a "
                            "global batch that divides")]

    def processes(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions) -> tuple[int, bool]:
        """How many processes to start here, and whether on the CPU."""
        import torch

        cpu = request.device == "cpu" or (request.device == "auto" and not torch.cuda.is_available())
        if options.processes:
            return options.processes, cpu
        if cpu:
            return 1, True
        return max(1, min(plan.hardware.gpus_per_instance, torch.cuda.device_count())), False

    def run(self, plan: Plan, request: RunRequest, options: HuggingFaceOptions,
            progress: ProgressCallback) -> RunResult:
        said = self.notices(plan, request, options)  # the summary records what was said at the start
        processes, cpu = self.processes(plan, request, options)
        machines = (options.machines or plan.hardware.instance_count) if options.main_process_ip else 1
        if processes > 1 or machines > 1:
            from .launch import launch

            result = launch(plan, request, processes=processes, cpu=cpu, progress=progress, machines=machines,
                            machine_rank=options.machine_rank, main_ip=options.main_process_ip or "127.0.0.1",
                            main_port=options.main_process_port)
        else:
            from .loop import train

            spec, source, tokenizer = load_for_training(plan, request)
            result = train(plan, spec, source, tokenizer, request, progress)
        if machines > 1:
            said.append(f"node {options.machine_rank} of {machines} (rendezvous at {options.main_process_ip}:"
                        f"{options.main_process_port})")
        result.notes = said + result.notes
        return result
