"""Config -> torch model with the fine-tuning method applied, the optimizer, and one training step.

The single place that turns a ModelSpec and a TrainingSetup into what a Hugging Face Trainer run
holds: `ftplan measure` uses it, and so will the bundled Hugging Face trainer backend, so what
is measured is what runs. torch, transformers, peft and bitsandbytes are imported inside the
functions; nothing here is on the estimate path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from typing import Any

from ftplan.errors import PlannerError
from ftplan.estimate.params import TargetResolution, resolve_targets
from ftplan.estimate.settings import TrainingSetup
from ftplan.model.spec import ModelSpec

LEARNING_RATE = 2e-4  # measuring memory and speed: any rate would do; the plan carries the recipe's


def _require_training_extra() -> None:
    import logging

    # bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel package is
    # missing; it falls back to its own kernel, so the warning is noise for ftplan's users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for name in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(name) is None:
            raise PlannerError(f"this needs the training extra ({name} is missing): pip install 'ftplan[train]'")


def weight_dtype(setup: TrainingSetup):
    """Storage dtype of the (base) weights: fp32 master weights for mixed precision and fp32,
    half precision for pure bf16/fp16 and for the frozen LoRA/QLoRA base."""
    import torch

    half = torch.float16 if setup.precision.startswith("fp16") else torch.bfloat16
    if setup.precision == "fp32":
        return torch.float32
    if setup.method == "full":
        return torch.float32 if setup.precision.endswith("-mixed") else half
    return half


def compute_dtype(setup: TrainingSetup):
    import torch

    if setup.precision == "fp32":
        return torch.float32
    return torch.float16 if setup.precision.startswith("fp16") else torch.bfloat16


def uses_autocast(setup: TrainingSetup) -> bool:
    """Autocast for the -mixed precisions (TrainingArguments(bf16=True) / fp16=True), for every method; plain
    bf16/fp16 keep the weights in half precision and do not autocast."""
    return setup.precision.endswith("-mixed")


def autocast(setup: TrainingSetup, device: str):
    import torch

    if not uses_autocast(setup):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=compute_dtype(setup))


def hf_config(spec: ModelSpec, setup: TrainingSetup):
    """The transformers config for `spec`, with the attention implementation and no KV cache."""
    from transformers import AutoConfig

    values = dict(spec.config)
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as exc:
        raise PlannerError(f"transformers cannot build model_type '{model_type}': {exc}") from None
    config._attn_implementation = setup.attention  # transformers' own names
    config.use_cache = False
    return config


def _load_quantized(source: str, setup: TrainingSetup, device: str, trust_remote_code: bool, sharded: bool = False):
    """Weights from a directory or Hub id (safetensors only), quantized by bitsandbytes as they load.

    `sharded`: FSDP shards only tensors of one float dtype, so the packed 4-bit weights are stored
    in the compute dtype (bnb_4bit_quant_storage), the QLoRA + FSDP recipe; the bytes are the same.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=setup.quant_type,
                               bnb_4bit_use_double_quant=setup.double_quant,
                               bnb_4bit_compute_dtype=compute_dtype(setup),
                               **({"bnb_4bit_quant_storage": compute_dtype(setup)} if sharded else {}))
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, dtype=weight_dtype(setup),
                                                device_map=device, use_safetensors=True,
                                                trust_remote_code=trust_remote_code,
                                                attn_implementation=setup.attention)


def _quantized_from_config(config, setup: TrainingSetup, device: str, trust_remote_code: bool, sharded: bool = False):
    """Random-initialised weights, saved as safetensors and reloaded through bitsandbytes, which
    is how a real checkpoint reaches 4 bit (from_config cannot quantize)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a save/load round trip, not a download: no bars
    with tempfile.TemporaryDirectory(prefix="ftplan-qlora-") as tmp:
        with torch.device(device):  # random init on the GPU when there is one: far faster for 7B models
            model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(setup),
                                                     trust_remote_code=trust_remote_code)
        # the generation config follows the training config's use_cache=False, which Gemma-2's "hybrid" cache
        # setting makes invalid to save; generation plays no part in this round trip
        model.generation_config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        del model
        return _load_quantized(tmp, setup, device, trust_remote_code, sharded)


def apply_lora(model, targets: TargetResolution, setup: TrainingSetup):
    """Wrap `model` with PEFT LoRA adapters exactly as resolved by ftplan (fp32 adapters)."""
    from peft import LoraConfig, get_peft_model

    lora = setup.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets.peft_value(), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build_model(spec: ModelSpec, setup: TrainingSetup, *, device: str = "cpu", pretrained: str | None = None,
                trust_remote_code: bool = False, sharded: bool = False):
    """The model of `spec` ready to train under `setup` on `device`.

    full: weights in their storage dtype, all trainable; lora: frozen half-precision base plus
    PEFT adapters; qlora: bitsandbytes 4-bit base, `prepare_model_for_kbit_training`, adapters.
    `pretrained` loads real weights from a local directory or a Hugging Face id (safetensors only,
    never pickle); otherwise the weights are random, which is all memory and speed measurements need.
    """
    _require_training_extra()
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, setup)
    # process-wide in torch, as TrainingArguments(tf32=...) sets it; off is PyTorch's default, set explicitly so
    # a setup without TF32 is measured without it whatever ran before in the process
    torch.backends.cuda.matmul.allow_tf32 = setup.tf32
    ckpt_kwargs = {"use_reentrant": False}
    if setup.method == "qlora":
        from peft import prepare_model_for_kbit_training

        if pretrained:
            model = _load_quantized(pretrained, setup, device, trust_remote_code, sharded)
        else:
            model = _quantized_from_config(config, setup, device, trust_remote_code, sharded)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.grad_ckpt,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        if pretrained:
            model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=weight_dtype(setup), use_safetensors=True,
                                                         trust_remote_code=trust_remote_code, config=config)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=weight_dtype(setup),
                                                         trust_remote_code=trust_remote_code)
        model.to(device)
        if setup.method == "lora":
            model.requires_grad_(False)
        if setup.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if setup.method != "full":
        from ftplan.model.inventory import layout_for

        targets = resolve_targets(layout_for(spec, trust_remote_code=trust_remote_code)[0], setup.lora.targets)
        model = apply_lora(model, targets, setup)
    model.config.use_cache = False
    model.train()
    return model


def build_optimizer(model, setup: TrainingSetup):
    """The optimizer the Trainer creates for `setup.optimizer` (a TrainingArguments.optim name), over the
    trainable parameters - with its override that keeps nn.Embedding weights at 32-bit states under 8-bit
    bitsandbytes optimizers."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    name = setup.optimizer
    if name in ("adamw_torch_fused", "adamw_torch"):  # adamw_torch: foreach on CUDA, a loop on the CPU
        return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=name == "adamw_torch_fused" or None)
    if name == "sgd":
        return torch.optim.SGD(params, lr=LEARNING_RATE)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=LEARNING_RATE, scale_parameter=False, relative_step=False, warmup_init=False)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PlannerError(f"--optimizer {name} needs bitsandbytes: pip install 'ftplan[train]'") from None
    bits = 8 if name in ("adamw_bnb_8bit", "paged_adamw_8bit") else 32
    optimizer = bnb.optim.AdamW(params, lr=LEARNING_RATE, optim_bits=bits, is_paged=name.startswith("paged_"))
    if bits == 8:
        manager = bnb.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def random_batch(vocab: int, setup: TrainingSetup, device: str, generator=None) -> dict[str, Any]:
    """Random token ids (labels = inputs), the shape of one micro-batch."""
    import torch

    ids = torch.randint(0, vocab, (setup.batch_size, setup.seq_len), device=device, generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model, optimizer, batch: dict, setup: TrainingSetup, device: str, *, kept: dict | None = None,
               micro_steps: int = 1, on_forward_end=None, on_backward_end=None) -> float:
    """One optimizer step over `micro_steps` micro-batches (gradient accumulation: .grad holds the sum across
    them, each loss divided by their count as the Trainer does), each as `setup.loop` says: the Trainer's, where
    the loss alone outlives the forward (the model's outputs, logits included, are dropped), or a plain loop's
    (`outputs = model(**batch)`), whose outputs stay bound until the next forward returns - `kept` holds them
    across calls. Then clip to the recipe's max grad norm, step, zero. The callbacks (after the last micro-step's
    forward and backward) let a measurement look at memory between the phases."""
    import torch

    for micro in range(micro_steps):
        with autocast(setup, device):
            if setup.loop == "custom":
                outputs = model(**batch)  # the previous outputs are still bound while this forward runs
                if kept is not None:
                    kept["outputs"] = outputs
                loss = outputs.loss
            else:
                loss = model(**batch).loss
        last = micro == micro_steps - 1
        if last and on_forward_end is not None:
            on_forward_end()
        (loss / micro_steps if micro_steps > 1 else loss).backward()
        if setup.loop == "custom":
            del outputs
    if on_backward_end is not None:
        on_backward_end()
    from ftplan.data import catalog

    max_norm = catalog.planning().recipes.max_grad_norm[setup.method]
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
